//! The deployment files, checked with the real tools (installed by scripts/deploy-tools.sh
//! into target/deploy-venv; the test fails, not skips, when they cannot be installed):
//! - helm/sirocco renders (`helm template`, through helm-python-sdk's Helm engine) and
//!   passes `helm lint --strict`, with its defaults and with every helm/sirocco/ci/ file;
//! - every rendered manifest passes `kubernetes-validate --strict`; the only kinds it may
//!   not know are CRDs (ServiceMonitor), which it reports as a warning and skips;
//! - values.schema.json refuses a wrong type and an unknown key, naming the key, and the
//!   templates refuse a tp that is not a multiple of ranksPerPod;
//! - the chart's copy of the Grafana dashboard equals deploy/grafana/sirocco-dashboard.json;
//! - every deploy/skypilot/ task loads with `sky.Task.from_yaml` offline (the SkyServe one
//!   with its service section);
//! - every `sirocco <cmd> ...` line in the rendered manifests and the SkyPilot `run:`
//!   scripts uses only flags that `sirocco <cmd> --help` lists.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// Runs scripts/deploy-tools.sh; returns the venv's bin directory.
fn tools() -> PathBuf {
    let out = Command::new("bash")
        .arg(repo().join("scripts/deploy-tools.sh"))
        .output()
        .expect("cannot run scripts/deploy-tools.sh");
    assert!(
        out.status.success(),
        "scripts/deploy-tools.sh could not set up helm-python-sdk, kubernetes-validate and skypilot \
         (PyPI must be reachable):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    PathBuf::from(stdout.lines().last().expect("deploy-tools.sh printed nothing").trim())
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn helm(bin: &Path, args: &[&str]) -> Output {
    run(Command::new(bin.join("helm")).args(args).current_dir(repo()))
}

/// The values files to render: the defaults (None) and helm/sirocco/ci/*.yaml.
fn values_files() -> Vec<Option<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("helm/sirocco/ci"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 4,
        "expected at least 4 example values files in helm/sirocco/ci"
    );
    std::iter::once(None).chain(files.into_iter().map(Some)).collect()
}

/// `sirocco [global flags] <cmd> --flags`: the long flags each subcommand's --help lists
/// (the global flags are listed under every subcommand).
fn known_flags(cmd: &str) -> BTreeSet<String> {
    let out = run(Command::new(support::sirocco_bin()).args([cmd, "--help"]));
    assert!(out.status.success(), "sirocco {cmd} --help failed: {}", text(&out));
    text(&out)
        .split_whitespace()
        .filter(|w| w.starts_with("--"))
        .map(|w| w.trim_end_matches(',').split(['=', '<']).next().unwrap().to_string())
        .collect()
}

/// Every `sirocco <cmd> ...` command in `script`, as (cmd, flags used), following shell
/// line continuations. Tokens before the subcommand are global flags.
fn sirocco_commands(script: &str) -> Vec<(String, Vec<String>)> {
    let joined = script.replace("\\\n", " ");
    let mut found = Vec::new();
    for line in joined.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        for (i, w) in words.iter().enumerate() {
            if !(*w == "sirocco" || w.ends_with("/sirocco") || w.ends_with("\"sirocco\"")) {
                continue;
            }
            let mut flags = Vec::new();
            let mut cmd = None;
            let mut j = i + 1;
            while j < words.len() {
                let t = words[j].trim_matches(['"', '\'', ',', '[', ']']);
                if t.starts_with("--") {
                    let flag = t.split('=').next().unwrap().to_string();
                    if !t.contains('=') && cmd.is_none() {
                        j += 1; // a global flag's separate value
                    }
                    flags.push(flag);
                } else if cmd.is_none() && !t.is_empty() && !t.starts_with('$') && !t.starts_with('"') {
                    cmd = Some(t.to_string());
                } else if ["&", "&&", "|", ";", ">", "2>&1"].contains(&t) || t.starts_with('>') {
                    break;
                }
                j += 1;
            }
            if let Some(c) = cmd {
                found.push((c, flags));
            }
        }
    }
    found
}

fn check_flags(origin: &str, commands: &[(String, Vec<String>)], cache: &mut BTreeMap<String, BTreeSet<String>>) {
    for (cmd, flags) in commands {
        let known = cache.entry(cmd.clone()).or_insert_with(|| known_flags(cmd));
        for f in flags {
            assert!(
                known.contains(f),
                "{origin}: `sirocco {cmd}` has no flag {f} (see `sirocco {cmd} --help`)"
            );
        }
    }
}

/// The container command lines (command + args joined) of every rendered manifest.
fn container_commands(bin: &Path, manifests: &Path) -> String {
    let script = r#"
import sys, yaml
for doc in yaml.safe_load_all(open(sys.argv[1])):
    if not doc:
        continue
    spec = doc.get("spec", {})
    pod = spec.get("template", {}).get("spec", spec)
    for c in pod.get("initContainers", []) + pod.get("containers", []):
        print(" ".join(c.get("command", []) + c.get("args", [])).replace("\n", " "))
"#;
    let out = run(Command::new(bin.join("python")).args(["-c", script]).arg(manifests));
    assert!(
        out.status.success(),
        "cannot read {}: {}",
        manifests.display(),
        text(&out)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn helm_chart_renders_lints_validates_and_runs_real_flags() {
    let bin = tools();
    let tmp = tempfile::tempdir().unwrap();
    let mut flag_cache = BTreeMap::new();
    let mut sirocco_lines = 0;

    for (n, values) in values_files().iter().enumerate() {
        let mut args = vec!["template", "demo", "helm/sirocco", "--namespace", "ml"];
        let mut lint = vec!["lint", "helm/sirocco", "--strict"];
        let label = match values {
            Some(v) => {
                let v = v.to_str().unwrap();
                args.extend(["-f", v]);
                lint.extend(["-f", v]);
                v.rsplit('/').next().unwrap().to_string()
            }
            None => "the defaults".to_string(),
        };
        let out = helm(&bin, &args);
        assert!(
            out.status.success(),
            "helm template with {label} failed:\n{}",
            text(&out)
        );
        let rendered = String::from_utf8(out.stdout).unwrap();
        for kind in [
            "Deployment",
            "StatefulSet",
            "Service",
            "NetworkPolicy",
            "ServiceAccount",
        ] {
            assert!(
                rendered.contains(&format!("\nkind: {kind}\n")),
                "{label}: no {kind} rendered"
            );
        }
        let file = tmp.path().join(format!("rendered-{n}.yaml"));
        std::fs::write(&file, &rendered).unwrap();

        let out = helm(&bin, &lint);
        assert!(
            out.status.success(),
            "helm lint --strict with {label} failed:\n{}",
            text(&out)
        );

        // Kubernetes 1.27 is the chart's kubeVersion floor; 1.30 is a common current one.
        for k8s in ["1.27.0", "1.30.0"] {
            let out = run(Command::new(bin.join("kubernetes-validate"))
                .args(["--strict", "-k", k8s])
                .arg(&file));
            let report = text(&out);
            assert!(
                out.status.success(),
                "kubernetes-validate {k8s} with {label}:\n{report}"
            );
            for line in report.lines().filter(|l| l.contains("Couldn't find schema")) {
                assert!(
                    line.contains("kind ServiceMonitor with api version monitoring.coreos.com/v1"),
                    "{label}: kubernetes-validate skipped a kind that is not a known CRD: {line}"
                );
            }
        }

        let commands = sirocco_commands(&container_commands(&bin, &file));
        assert!(
            commands.iter().any(|(c, _)| c == "router") && commands.iter().any(|(c, _)| c == "shard"),
            "{label}: expected `sirocco router` and `sirocco shard` containers, found {commands:?}"
        );
        sirocco_lines += commands.len();
        check_flags(&label, &commands, &mut flag_cache);
    }
    assert!(sirocco_lines > 0);
}

#[test]
fn helm_schema_and_templates_refuse_bad_values() {
    let bin = tools();
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        ("wrong type", "shard:\n  tp: four\n", "/shard/tp"),
        ("unknown key", "shard:\n  gpuPerRank: 1\n", "gpuPerRank"),
        ("unknown top-level key", "imag:\n  tag: x\n", "imag"),
        ("bad enum", "model:\n  dtype: int8\n", "/model/dtype"),
        ("negative GPUs", "shard:\n  gpusPerRank: -1\n", "/shard/gpusPerRank"),
        (
            "3 ranks per pod for tp 4",
            "shard:\n  tp: 4\n  ranksPerPod: 3\n",
            "must be a multiple of shard.ranksPerPod",
        ),
        ("no external etcd", "etcd:\n  enabled: false\n", "etcd.endpoints"),
    ];
    for (what, yaml, needle) in cases {
        let file = tmp.path().join("bad.yaml");
        std::fs::write(&file, yaml).unwrap();
        let out = helm(
            &bin,
            &["template", "demo", "helm/sirocco", "-f", file.to_str().unwrap()],
        );
        let msg = text(&out);
        assert!(!out.status.success(), "values with a {what} were accepted:\n{yaml}");
        assert!(
            msg.contains(needle),
            "the error for a {what} does not name {needle}:\n{msg}"
        );
    }
}

#[test]
fn chart_dashboard_is_the_grafana_dashboard() {
    let original = std::fs::read(repo().join("deploy/grafana/sirocco-dashboard.json")).unwrap();
    let copy = std::fs::read(repo().join("helm/sirocco/files/sirocco-dashboard.json")).unwrap();
    assert!(
        original == copy,
        "helm/sirocco/files/sirocco-dashboard.json differs from deploy/grafana/sirocco-dashboard.json: \
         cp deploy/grafana/sirocco-dashboard.json helm/sirocco/files/"
    );
}

#[test]
fn skypilot_tasks_load_offline_and_run_real_flags() {
    let bin = tools();
    let dir = repo().join("deploy/skypilot");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let home = tempfile::tempdir().unwrap();
    // Loads the task, prints its facts as JSON, then its run script.
    let script = r#"
import json, sys
import sky
t = sky.Task.from_yaml(sys.argv[1])
svc = getattr(t, "service", None)
clouds = sorted({str(r.cloud) for r in t.resources if r.cloud is not None})
print(json.dumps({"name": t.name, "num_nodes": t.num_nodes, "clouds": clouds,
                  "service": svc is not None,
                  "readiness_path": getattr(svc, "readiness_path", None) if svc else None}))
print(t.run or "")
"#;
    let mut flag_cache = BTreeMap::new();
    let mut kinds = BTreeSet::new();
    for f in &files {
        let out = run(Command::new(bin.join("python"))
            .args(["-c", script])
            .arg(f)
            .env("HOME", home.path())
            .env("SKYPILOT_DISABLE_USAGE_COLLECTION", "1")
            .env("SKYPILOT_DEBUG", "0")
            .env_remove("AWS_PROFILE")
            .env_remove("GOOGLE_APPLICATION_CREDENTIALS"));
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        assert!(
            out.status.success(),
            "sky.Task.from_yaml({name}) failed:\n{}",
            text(&out)
        );
        let stdout = String::from_utf8(out.stdout).unwrap();
        let (facts, run_script) = stdout.split_once('\n').unwrap();
        for cloud in ["AWS", "GCP", "Azure"] {
            assert!(facts.contains(cloud), "{name}: not runnable on {cloud}: {facts}");
        }
        if facts.contains("\"service\": true") {
            assert!(
                facts.contains("\"readiness_path\": \"/ready\""),
                "{name}: readiness probe not /ready: {facts}"
            );
            kinds.insert("service");
        } else if !facts.contains("\"num_nodes\": 1,") {
            for var in ["SKYPILOT_NODE_RANK", "SKYPILOT_NODE_IPS", "SKYPILOT_NUM_GPUS_PER_NODE"] {
                assert!(
                    run_script.contains(var),
                    "{name}: multi-node run script does not use {var}"
                );
            }
            kinds.insert("multi-node");
        } else {
            kinds.insert("single-node");
        }
        let commands = sirocco_commands(run_script);
        assert!(!commands.is_empty(), "{name}: the run script starts no sirocco command");
        check_flags(&name, &commands, &mut flag_cache);
    }
    assert_eq!(
        kinds,
        BTreeSet::from(["service", "multi-node", "single-node"]),
        "deploy/skypilot should hold a single-node task, a multi-node task and a SkyServe service"
    );
}

#[test]
fn flag_extraction_finds_commands() {
    let cmds = sirocco_commands("x=1\nexec ~/bin/sirocco --log-format=json shard \\\n  --rank \"$R\" --listen=a:1 &\n");
    assert_eq!(
        cmds,
        vec![(
            "shard".to_string(),
            vec!["--log-format".into(), "--rank".into(), "--listen".into()]
        )]
    );
    let cmds = sirocco_commands("sirocco --log-format json router --etcd=x");
    assert_eq!(
        cmds,
        vec![("router".to_string(), vec!["--log-format".into(), "--etcd".into()])]
    );
}
