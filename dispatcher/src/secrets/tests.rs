use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;

use secrecy::ExposeSecret as _;

use super::kubernetes::{
    ANNOTATION_KEYS, LABEL_SECRET, LABEL_TENANT, is_owned, meta_of, object_name, secret_object,
};
use super::{
    LocalSecrets, MAX_KEYS, MAX_SECRETS_PER_TENANT, MAX_TOTAL_BYTES, MAX_VALUE_BYTES, SecretError,
    SecretMeta, SecretStore, Unresolved, Written, first_unresolved, validate_data, validate_name,
};
use crate::k8s::names::is_dns_label;
use crate::task::{EnvValue, SecretRef};

fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn now() -> jiff::Timestamp {
    "2026-12-02T12:00:00Z".parse().unwrap()
}

#[test]
fn names_are_labels_and_data_is_bounded_naming_the_key_never_the_value() {
    assert!(validate_name("openai").is_ok());
    for bad in ["OpenAI", "", "a.b", "-a", &"a".repeat(64)] {
        assert_eq!(validate_name(bad).unwrap_err().field, "name", "{bad:?}");
    }
    let field = |pairs: BTreeMap<String, String>| validate_data(pairs).unwrap_err();
    assert!(validate_data(data(&[("token", "s3cret"), ("tls.crt", "x")])).is_ok());
    assert_eq!(field(BTreeMap::new()).field, "data");
    let too_many = (0..=MAX_KEYS)
        .map(|i| (format!("k{i}"), "v".to_owned()))
        .collect();
    assert_eq!(field(too_many).field, "data");
    assert_eq!(field(data(&[("a/b", "x")])).field, "data.a/b");
    assert_eq!(field(data(&[("..", "x")])).field, "data...");
    let big = "x".repeat(MAX_VALUE_BYTES + 1);
    let error = field(data(&[("big", &big)]));
    assert_eq!(error.field, "data.big");
    assert!(!error.message.contains("xxx"), "{}", error.message);
    let nul = field(data(&[("token", "s3c\0ret")]));
    assert_eq!(nul.field, "data.token");
    assert!(!nul.message.contains("s3c"), "{}", nul.message);
    // Each value under the limit, all of them over the total.
    let quarter = "x".repeat(MAX_VALUE_BYTES);
    let total = (0..=MAX_TOTAL_BYTES / MAX_VALUE_BYTES)
        .map(|i| (format!("k{i}"), quarter.clone()))
        .collect();
    assert_eq!(field(total).field, "data");
}

#[test]
fn validated_values_are_redacted_in_debug() {
    let validated = validate_data(data(&[("token", "s3cret-value")])).unwrap();
    let shown = format!("{validated:?}");
    assert!(!shown.contains("s3cret-value"), "{shown}");
    assert_eq!(validated["token"].expose_secret(), "s3cret-value");
}

fn reference(secret: &str, key: &str) -> EnvValue {
    EnvValue::Secret(SecretRef {
        secret: secret.into(),
        key: key.into(),
    })
}

fn meta(name: &str, keys: &[&str]) -> SecretMeta {
    SecretMeta {
        name: name.into(),
        keys: keys.iter().map(|k| (*k).to_owned()).collect(),
        created_at: now(),
        updated_at: now(),
    }
}

#[test]
fn the_first_unresolved_reference_names_the_variable_and_what_is_missing() {
    let env: BTreeMap<String, EnvValue> = [
        ("A_PLAIN".to_owned(), EnvValue::Plain("x".into())),
        ("B_TOKEN".to_owned(), reference("openai", "token")),
        ("C_ORG".to_owned(), reference("openai", "org")),
        ("D_HF".to_owned(), reference("hf", "token")),
    ]
    .into();
    let all = |openai: Option<SecretMeta>, hf: Option<SecretMeta>| {
        BTreeMap::from([("openai".to_owned(), openai), ("hf".to_owned(), hf)])
    };
    let found = |openai, hf| first_unresolved(&env, &all(openai, hf));
    assert_eq!(
        found(
            Some(meta("openai", &["org", "token"])),
            Some(meta("hf", &["token"]))
        ),
        None
    );
    let missing_key = found(
        Some(meta("openai", &["token"])),
        Some(meta("hf", &["token"])),
    );
    assert_eq!(
        missing_key,
        Some(Unresolved {
            variable: "C_ORG".into(),
            secret: "openai".into(),
            key: "org".into(),
            existing_keys: Some(vec!["token".into()]),
        })
    );
    let missing_key = missing_key.unwrap();
    assert_eq!(missing_key.field(), "env.C_ORG");
    assert_eq!(
        missing_key.to_string(),
        "secret 'openai' has no key 'org' (its keys: token)"
    );
    let missing_secret = found(Some(meta("openai", &["org", "token"])), None).unwrap();
    assert_eq!(missing_secret.field(), "env.D_HF");
    assert_eq!(
        missing_secret.to_string(),
        "secret 'hf' does not exist (PUT /v1/secrets/hf first)"
    );
}

#[test]
fn object_names_are_unambiguous_subdomains() {
    // With '-' as the separator these two would share a name.
    assert_ne!(object_name("a-b", "c"), object_name("a", "b-c"));
    let longest = object_name(&"t".repeat(63), &"n".repeat(63));
    assert_eq!(longest.len(), 137);
    assert!(longest.len() <= 253 && longest.split('.').all(is_dns_label));
    assert_eq!(object_name("acme", "openai"), "ab-secret.acme.openai");
}

#[test]
fn a_secret_object_is_labelled_typed_and_its_metadata_shows_keys_only() {
    let validated = validate_data(data(&[("token", "s3cret"), ("org", "o-1")])).unwrap();
    let secret = secret_object("agent-bus-tasks", "acme", "openai", &validated, now());
    assert_eq!(secret.type_.as_deref(), Some("Opaque"));
    assert_eq!(secret.immutable, Some(false));
    let labels = secret.metadata.labels.clone().unwrap();
    assert_eq!(labels[LABEL_TENANT], "acme");
    assert_eq!(labels[LABEL_SECRET], "openai");
    assert_eq!(labels["app.kubernetes.io/managed-by"], "agent-bus");
    assert_eq!(secret.data.as_ref().unwrap()["token"].0, b"s3cret".to_vec());
    let metadata = serde_json::to_string(&secret.metadata).unwrap();
    assert!(!metadata.contains("s3cret"), "{metadata}");
    assert_eq!(
        secret.metadata.annotations.as_ref().unwrap()[ANNOTATION_KEYS],
        r#"["org","token"]"#
    );

    let shown = meta_of(&secret.metadata, "acme").unwrap();
    assert_eq!(shown.name, "openai");
    assert_eq!(shown.keys, ["org", "token"]);
    assert_eq!(shown.updated_at, now());
    // Another tenant's, or one made by hand, is nobody's.
    assert!(meta_of(&secret.metadata, "globex").is_none());
    let mut by_hand = secret.metadata.clone();
    by_hand
        .labels
        .as_mut()
        .unwrap()
        .remove("app.kubernetes.io/managed-by");
    assert!(!is_owned(&by_hand, "acme", "openai"));
    assert!(meta_of(&by_hand, "acme").is_none());
    let mut relabelled = secret.metadata.clone();
    relabelled
        .labels
        .as_mut()
        .unwrap()
        .insert(LABEL_SECRET.into(), "other".into());
    assert!(meta_of(&relabelled, "acme").is_none());
}

/// A fresh folder under the system's temporary one, removed when dropped.
struct Folder(PathBuf);

impl Folder {
    fn new() -> Self {
        Self(std::env::temp_dir().join(format!(
            "agent-bus-secrets-{}",
            uuid::Uuid::new_v4().simple()
        )))
    }
}

impl Drop for Folder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn the_local_store_writes_owner_only_files_atomically_and_per_tenant() {
    let folder = Folder::new();
    let store = SecretStore::Local(LocalSecrets::open(folder.0.clone()).unwrap());
    let put = |tenant: &'static str, name: &'static str, pairs: &[(&str, &str)], at| {
        let store = store.clone();
        let validated = validate_data(data(pairs)).unwrap();
        async move { store.put(tenant, name, validated, at).await.unwrap() }
    };

    let (written, created) = put("acme", "openai", &[("token", "s3cret")], now()).await;
    assert_eq!(written, Written::Created);
    assert_eq!(created.keys, ["token"]);
    let later = now() + jiff::SignedDuration::from_secs(60);
    let (written, replaced) = put("acme", "openai", &[("org", "o"), ("token", "t2")], later).await;
    assert_eq!(written, Written::Replaced);
    assert_eq!(replaced.keys, ["org", "token"]);
    assert_eq!((replaced.created_at, replaced.updated_at), (now(), later));
    put("globex", "openai", &[("token", "globex-value")], now()).await;

    assert_eq!(mode(&folder.0), 0o700);
    assert_eq!(mode(&folder.0.join("acme")), 0o700);
    let file = folder.0.join("acme").join("openai.json");
    assert_eq!(mode(&file), 0o600);
    let leftovers: Vec<_> = std::fs::read_dir(folder.0.join("acme"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, ["openai.json"], "no temporary file is left");

    assert_eq!(
        store.get("acme", "openai").await.unwrap(),
        Some(replaced.clone())
    );
    assert_eq!(store.list("acme").await.unwrap(), [replaced]);
    assert_eq!(store.get("acme", "hf").await.unwrap(), None);
    assert_eq!(store.list("initech").await.unwrap(), []);

    let env: BTreeMap<String, EnvValue> = [
        ("TOKEN".to_owned(), reference("openai", "token")),
        ("MODE".to_owned(), EnvValue::Plain("fast".into())),
    ]
    .into();
    let SecretStore::Local(local) = &store else {
        unreachable!()
    };
    let values = local.resolve("acme", &env).await.unwrap().unwrap();
    assert_eq!(values.len(), 1);
    assert_eq!(values[0].0, "TOKEN");
    assert_eq!(values[0].1.expose_secret(), "t2", "the tenant's own value");
    let globex = local.resolve("globex", &env).await.unwrap().unwrap();
    assert_eq!(globex[0].1.expose_secret(), "globex-value");

    assert!(store.delete("acme", "openai").await.unwrap());
    assert!(!store.delete("acme", "openai").await.unwrap());
    let gone = local.resolve("acme", &env).await.unwrap().unwrap_err();
    assert_eq!(gone.field(), "env.TOKEN");
    assert_eq!(
        store.get("globex", "openai").await.unwrap().unwrap().keys,
        ["token"],
        "another tenant's secret of the same name is untouched"
    );
}

#[tokio::test]
async fn the_local_store_tightens_its_folder_and_refuses_path_tricks() {
    let folder = Folder::new();
    std::fs::create_dir_all(&folder.0).unwrap();
    std::fs::set_permissions(&folder.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let store = LocalSecrets::open(folder.0.clone()).unwrap();
    assert_eq!(
        mode(&folder.0),
        0o700,
        "an existing folder is made owner-only"
    );
    let store = SecretStore::Local(store);
    for (tenant, name) in [("../acme", "x"), ("acme", "../x"), ("acme", "a/b")] {
        let result = store.get(tenant, name).await;
        assert!(
            matches!(result, Err(SecretError::BadName { .. })),
            "{tenant} {name}"
        );
    }
}

#[tokio::test]
async fn a_tenant_keeps_at_most_the_limit_of_secrets() {
    let folder = Folder::new();
    let store = SecretStore::Local(LocalSecrets::open(folder.0.clone()).unwrap());
    let one = || validate_data(data(&[("k", "v")])).unwrap();
    for i in 0..MAX_SECRETS_PER_TENANT {
        store
            .put("acme", &format!("s{i}"), one(), now())
            .await
            .unwrap();
    }
    let refused = store.put("acme", "one-more", one(), now()).await;
    assert!(
        matches!(refused, Err(SecretError::TooMany { limit, .. }) if limit == MAX_SECRETS_PER_TENANT)
    );
    // Replacing one still works, and other tenants are not limited by acme's.
    store.put("acme", "s0", one(), now()).await.unwrap();
    store.put("globex", "s0", one(), now()).await.unwrap();
}
