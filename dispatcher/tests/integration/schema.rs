//! The two schemas agree: PostgreSQL (`tests/env/up postgres`, `DATABASE_URL`) and SQLite,
//! both migrated by the store, have the same tables, the same columns with the same types
//! as the store reads them and the same nullability, and the same indexes. One set of SQL
//! serves both (docs/adr/0002), so a migration written for one and forgotten for the other
//! fails here.
use std::collections::BTreeMap;

use dispatcher::store::Store;
use dispatcher::task::TaskId;
use sqlx::Connection as _;

/// A column as the store sees it: its type class and whether it may be NULL.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Column {
    kind: &'static str,
    nullable: bool,
}

/// An index other than a primary key: its columns in order, unique or not, partial or not.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Index {
    table: String,
    columns: Vec<String>,
    unique: bool,
    partial: bool,
}

#[derive(Debug, PartialEq, Eq)]
struct Schema {
    tables: BTreeMap<String, BTreeMap<String, Column>>,
    indexes: Vec<Index>,
}

/// The type class of a PostgreSQL column: what the store binds and decodes.
fn postgres_kind(data_type: &str) -> &'static str {
    match data_type {
        "text" | "character varying" => "text",
        "integer" => "integer",
        "bigint" => "bigint",
        "double precision" => "double",
        "real" => "float4",
        "boolean" => "boolean",
        other => panic!("a PostgreSQL type the store does not read: {other}"),
    }
}

/// The type class of an SQLite column from its declared type (SQLite's `REAL` is an
/// 8-byte float; an `INTEGER PRIMARY KEY` is the 64-bit row id).
fn sqlite_kind(declared: &str, rowid: bool) -> &'static str {
    match declared.to_ascii_uppercase().as_str() {
        "TEXT" => "text",
        "INTEGER" if rowid => "bigint",
        "INTEGER" => "integer",
        "BIGINT" => "bigint",
        "REAL" | "DOUBLE PRECISION" => "double",
        "BOOLEAN" => "boolean",
        other => panic!("an SQLite type the store does not read: {other}"),
    }
}

async fn postgres_schema(url: &str) -> Schema {
    let mut db = sqlx::PgConnection::connect(url).await.unwrap();
    let columns: Vec<(String, String, String, String)> = sqlx::query_as(
        "SELECT table_name::text, column_name::text, data_type::text, is_nullable::text \
         FROM information_schema.columns \
         WHERE table_schema = 'public' AND table_name NOT LIKE '\\_sqlx%'",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    let mut tables: BTreeMap<String, BTreeMap<String, Column>> = BTreeMap::new();
    for (table, column, data_type, nullable) in columns {
        tables.entry(table).or_default().insert(
            column,
            Column {
                kind: postgres_kind(&data_type),
                nullable: nullable == "YES",
            },
        );
    }
    let rows: Vec<(String, Vec<String>, bool, bool)> = sqlx::query_as(
        "SELECT t.relname::text, \
             ARRAY(SELECT a.attname::text FROM unnest(i.indkey) WITH ORDINALITY AS k(attnum, n) \
                   JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum \
                   ORDER BY k.n), \
             i.indisunique, i.indpred IS NOT NULL \
         FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid \
         JOIN pg_namespace n ON n.oid = t.relnamespace \
         WHERE n.nspname = 'public' AND NOT i.indisprimary AND t.relname NOT LIKE '\\_sqlx%'",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    let mut indexes: Vec<Index> = rows
        .into_iter()
        .map(|(table, columns, unique, partial)| Index {
            table,
            columns,
            unique,
            partial,
        })
        .collect();
    indexes.sort();
    db.close().await.unwrap();
    Schema { tables, indexes }
}

async fn sqlite_schema(url: &str) -> Schema {
    let mut db = sqlx::SqliteConnection::connect(url).await.unwrap();
    let names: Vec<(String, String)> = sqlx::query_as(
        "SELECT name, sql FROM sqlite_master WHERE type = 'table' \
         AND name NOT LIKE '\\_sqlx%' ESCAPE '\\' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    let mut tables: BTreeMap<String, BTreeMap<String, Column>> = BTreeMap::new();
    let mut indexes = Vec::new();
    for (table, sql) in names {
        let without_rowid = sql.to_ascii_uppercase().contains("WITHOUT ROWID");
        let columns: Vec<(String, String, i64, i64)> =
            sqlx::query_as("SELECT name, type, \"notnull\", pk FROM pragma_table_info(?)")
                .bind(&table)
                .fetch_all(&mut db)
                .await
                .unwrap();
        let key_columns = columns.iter().filter(|c| c.3 > 0).count();
        let entry = tables.entry(table.clone()).or_default();
        for (name, declared, not_null, pk) in columns {
            let rowid = pk > 0 && key_columns == 1 && !without_rowid;
            entry.insert(
                name,
                Column {
                    kind: sqlite_kind(&declared, rowid && declared.eq_ignore_ascii_case("INTEGER")),
                    // Primary key columns are never NULL in PostgreSQL; the store treats them alike.
                    nullable: not_null == 0 && pk == 0,
                },
            );
        }
        let listed: Vec<(String, i64, String, i64)> =
            sqlx::query_as("SELECT name, \"unique\", origin, partial FROM pragma_index_list(?)")
                .bind(&table)
                .fetch_all(&mut db)
                .await
                .unwrap();
        for (index, unique, origin, partial) in listed {
            if origin == "pk" {
                continue;
            }
            let columns: Vec<(String,)> =
                sqlx::query_as("SELECT name FROM pragma_index_info(?) ORDER BY seqno")
                    .bind(&index)
                    .fetch_all(&mut db)
                    .await
                    .unwrap();
            indexes.push(Index {
                table: table.clone(),
                columns: columns.into_iter().map(|(c,)| c).collect(),
                unique: unique != 0,
                partial: partial != 0,
            });
        }
    }
    indexes.sort();
    db.close().await.unwrap();
    Schema { tables, indexes }
}

#[tokio::test]
async fn postgres_and_sqlite_migrate_to_the_same_schema() {
    testsupport::needs_env!(Postgres);
    let sqlite_path =
        std::env::temp_dir().join(format!("agent-bus-schema-{}.db", TaskId::new().simple()));
    let sqlite_url = format!("sqlite://{}", sqlite_path.display());
    let store = Store::connect(&sqlite_url, 1).await.unwrap();
    store.migrate().await.unwrap();
    store.close().await;
    let sqlite = sqlite_schema(&sqlite_url).await;
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", sqlite_path.display()));
    }

    let postgres = testsupport::with_database(|db| async move {
        let store = Store::connect(&db.url, 1).await.unwrap();
        store.migrate().await.unwrap();
        store.close().await;
        postgres_schema(&db.url).await
    })
    .await;

    assert!(
        sqlite.tables.contains_key("tasks") && sqlite.tables["tasks"].len() > 20,
        "the schema was read: {sqlite:#?}"
    );
    for (table, columns) in &postgres.tables {
        assert_eq!(
            Some(columns),
            sqlite.tables.get(table),
            "table {table} differs"
        );
    }
    assert_eq!(
        postgres.tables.keys().collect::<Vec<_>>(),
        sqlite.tables.keys().collect::<Vec<_>>()
    );
    assert_eq!(postgres.indexes, sqlite.indexes);
}
