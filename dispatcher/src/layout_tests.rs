//! Tests of the source tree's shape, read from the files: the top-level modules depend
//! on each other without cycles, and only the lifecycle moves tasks.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The top-level module a file belongs to (`api` for `src/api/tasks.rs`).
fn module_of(path: &Path) -> String {
    let relative = path.strip_prefix(src()).unwrap();
    let first = relative.components().next().unwrap().as_os_str();
    first.to_string_lossy().trim_end_matches(".rs").to_owned()
}

/// The code of a file without comments (doc links name modules without using them).
fn code(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Which top-level modules each top-level module names through `crate::`.
fn dependencies() -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in sources(&src()) {
        let module = module_of(&file);
        if matches!(module.as_str(), "main" | "lib" | "layout_tests" | "bin") {
            continue;
        }
        let code = code(&file);
        let used = graph.entry(module.clone()).or_default();
        for (at, _) in code.match_indices("crate::") {
            let name: String = code[at + "crate::".len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && name != module {
                used.insert(name);
            }
        }
    }
    graph
}

/// A cycle through `start`, if any, as the path of modules.
fn cycle_from(
    graph: &BTreeMap<String, BTreeSet<String>>,
    start: &str,
    at: &str,
    path: &mut Vec<String>,
) -> Option<Vec<String>> {
    for next in graph.get(at).into_iter().flatten() {
        if next == start {
            let mut cycle = path.clone();
            cycle.push(next.clone());
            return Some(cycle);
        }
        if !path.contains(next) {
            path.push(next.clone());
            if let Some(cycle) = cycle_from(graph, start, next, path) {
                return Some(cycle);
            }
            path.pop();
        }
    }
    None
}

#[test]
fn modules_depend_on_each_other_without_cycles() {
    let graph = dependencies();
    assert!(graph.contains_key("task") && graph.contains_key("lifecycle"));
    for module in graph.keys() {
        let cycle = cycle_from(&graph, module, module, &mut vec![module.clone()]);
        assert_eq!(cycle, None, "an import cycle; the graph: {graph:#?}");
    }
    // The pure core knows nothing of I/O.
    for (core, allowed) in [("task", ["k8s", "placement"]), ("k8s", ["", ""])] {
        let uses = &graph[core];
        assert!(
            uses.iter().all(|used| allowed.contains(&used.as_str())),
            "{core} uses {uses:?}"
        );
    }
}

#[test]
fn only_the_lifecycle_moves_tasks() {
    let mut callers = BTreeSet::new();
    for file in sources(&src()) {
        if module_of(&file) == "layout_tests" {
            continue;
        }
        let code = code(&file);
        let calls = [".transition(", ".transitions(", ".record_note("]
            .iter()
            .any(|call| code.contains(call));
        if calls {
            callers.insert(module_of(&file));
        }
    }
    callers.remove("store"); // where the primitives are defined and unit-tested
    assert_eq!(callers, BTreeSet::from(["lifecycle".to_owned()]));
}
