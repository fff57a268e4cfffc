//! Test support that more than one crate's tests need: where the repository and the
//! shared reference material are, the project's Python environment, and the files
//! the test-data tools take. A dev-dependency only; nothing here ships.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The repository's root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository root")
}

/// `../shared` beside the repository root. Tests fail (not skip) without it.
pub fn shared_dir() -> PathBuf {
    let dir = repo_root().join("../shared");
    assert!(
        dir.join("refs").is_dir(),
        "reference material missing: expected {} (the shared/ folder beside the repository)",
        dir.display()
    );
    dir.canonicalize().expect("the shared folder")
}

/// The random-weight reference model `name` of the shared material (`tiny`, `odd`).
pub fn ref_model(name: &str) -> PathBuf {
    let dir = shared_dir().join("refs").join(name);
    assert!(
        dir.join("config.json").is_file(),
        "the reference model {} is missing (see shared/refs/README.md)",
        dir.display()
    );
    dir
}

/// The venv's python, after running scripts/python-env.sh once per test process.
pub fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let script = repo_root().join("scripts/python-env.sh");
        let out = Command::new("bash")
            .arg(&script)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} failed ({}): the tests that run Python need python3 with its venv module and \
             access to PyPI for the pins there (grpcio, openai, numpy, ...)\n--- stderr\n{}\n--- stdout\n{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let py = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
        assert!(
            py.is_file(),
            "{} printed {py:?}, which is not the venv's python",
            script.display()
        );
        py
    })
}

/// Writes `sequences` token-id sequences of `len` ids (arbitrary, below 1000: GPTQ
/// needs activations, not sense) as the JSON list scripts/quantize-formats.py takes
/// for `--gptq-calibration`, at `dir/calibration.json`; returns that path.
pub fn arbitrary_calibration(dir: &Path, sequences: u32, len: u32) -> PathBuf {
    let ids: Vec<Vec<u32>> = (0..sequences)
        .map(|s| (0..len).map(|i| (s * 131 + i * 37 + i * i) % 1000).collect())
        .collect();
    let path = dir.join("calibration.json");
    std::fs::write(&path, serde_json::to_string(&ids).expect("ids as JSON")).expect("write the calibration file");
    path
}
