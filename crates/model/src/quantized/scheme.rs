//! `config.json`'s `quantization_config`, read into a [`QuantScheme`].

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// How a checkpoint stores its quantized linears.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QuantFormat {
    /// AutoGPTQ / GPTQModel. `zero_minus_one`: the stored zero point is the zero point − 1
    /// (`checkpoint_format: "gptq"`, the default); false for `"gptq_v2"`. `desc_act`: the
    /// config asks for act order (`g_idx` may then be a real permutation).
    Gptq { desc_act: bool, zero_minus_one: bool },
    /// AutoAWQ `version: "gemm"`.
    AwqGemm,
    /// compressed-tensors `pack-quantized`.
    CtPackQuantized,
    /// compressed-tensors `int-quantized` / `naive-quantized`.
    CtIntQuantized,
}

/// Which input columns share a scale and zero point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Granularity {
    /// One per output row.
    Channel,
    /// One per output row and `usize` consecutive input columns.
    Group(usize),
    /// One for the whole tensor (compressed-tensors `strategy: tensor`), loaded per channel.
    Tensor,
}

/// A module-name pattern of `ignore` / `modules_to_not_convert`.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Pattern {
    /// compressed-tensors: the exact module name, or a `re:` regex matched at the start.
    Exact(String),
    Regex(String),
    /// AWQ's `modules_to_not_convert`: a substring of the module name.
    Substring(String),
    /// GPTQ's `modules_in_block_to_quantize`: the module name ends with it.
    Suffix(String),
}

impl Pattern {
    fn matches(&self, module: &str) -> bool {
        match self {
            Pattern::Exact(s) => module == s,
            Pattern::Regex(r) => regex_match_start(r.as_bytes(), module.as_bytes()),
            Pattern::Substring(s) => module.contains(s.as_str()),
            Pattern::Suffix(s) => module == s || module.ends_with(&format!(".{s}")),
        }
    }
}

/// What `quantization_config` says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuantScheme {
    pub format: QuantFormat,
    /// 4 or 8.
    pub bits: u8,
    pub granularity: Granularity,
    /// Symmetric (no stored zero point, or a fixed one).
    pub symmetric: bool,
    /// compressed-tensors configs that also quantize activations (W8A8 …): the weights load
    /// alike; activations then run in float (more precise than the checkpoint assumed).
    pub activations_quantized: bool,
    /// Whether `lm_head` is quantized (GPTQ `lm_head: true`; compressed-tensors unless ignored).
    pub lm_head_quantized: bool,
    ignore: Vec<Pattern>,
    only: Vec<Pattern>,
}

impl QuantScheme {
    /// Whether the linear layer `module` (e.g. `model.layers.0.self_attn.q_proj` or `lm_head`)
    /// is stored quantized; the others (and embeddings, norms) stay float.
    pub fn is_quantized(&self, module: &str) -> bool {
        if self.ignore.iter().any(|p| p.matches(module)) {
            return false;
        }
        if module == "lm_head" || module.ends_with(".lm_head") {
            return self.lm_head_quantized;
        }
        self.only.is_empty() || self.only.iter().any(|p| p.matches(module))
    }

    /// The group size for a weight with `k` input columns (`k` when per channel or tensor).
    pub fn group_size_for(&self, k: usize) -> usize {
        match self.granularity {
            Granularity::Group(g) => g,
            Granularity::Channel | Granularity::Tensor => k,
        }
    }
}

fn field<'a>(qc: &'a Value, key: &str) -> Option<&'a Value> {
    qc.get(key).filter(|v| !v.is_null())
}

fn bool_field(qc: &Value, what: &str, key: &str, default: bool) -> Result<bool> {
    match field(qc, key) {
        None => Ok(default),
        Some(v) => v
            .as_bool()
            .with_context(|| format!("{what}.{key} = {v} is not a boolean")),
    }
}

fn bits_field(qc: &Value, what: &str, keys: &[&str], allowed: &[u8]) -> Result<u8> {
    let (key, v) = keys
        .iter()
        .find_map(|k| field(qc, k).map(|v| (*k, v)))
        .with_context(|| format!("{what} has no `{}`", keys[0]))?;
    let b = v
        .as_u64()
        .with_context(|| format!("{what}.{key} = {v} is not an integer"))?;
    match allowed.iter().find(|&&a| a as u64 == b) {
        Some(&a) => Ok(a),
        None => bail!("{what}.{key} = {b} is not supported (supported: {allowed:?})"),
    }
}

fn group_field(qc: &Value, what: &str, keys: &[&str]) -> Result<Granularity> {
    let Some((key, v)) = keys.iter().find_map(|k| field(qc, k).map(|v| (*k, v))) else {
        bail!("{what} has no `{}`", keys[0]);
    };
    match v.as_i64() {
        Some(-1) => Ok(Granularity::Channel),
        Some(g) if g > 0 => Ok(Granularity::Group(g as usize)),
        _ => bail!("{what}.{key} = {v} is not supported (a positive group size, or -1 for per channel)"),
    }
}

fn names(qc: &Value, what: &str, key: &str) -> Result<Vec<String>> {
    match field(qc, key) {
        None => Ok(vec![]),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_owned)
                    .with_context(|| format!("{what}.{key} holds {x}, not a module name"))
            })
            .collect(),
        Some(v) => bail!("{what}.{key} = {v} is not a list of module names"),
    }
}

/// Reads `config_json["quantization_config"]` (or compressed-tensors' older
/// `compression_config`): `Ok(None)` for a float checkpoint, an error naming the field for
/// anything this module cannot load (see the module doc for the supported variants).
pub fn read_quantization(config_json: &Value) -> Result<Option<QuantScheme>> {
    let Some((what, qc)) = ["quantization_config", "compression_config"]
        .iter()
        .find_map(|k| field(config_json, k).map(|v| (*k, v)))
    else {
        return Ok(None);
    };
    if !qc.is_object() {
        bail!("config.json: {what} is not an object");
    }
    let method = match field(qc, "quant_method") {
        Some(v) => v
            .as_str()
            .with_context(|| format!("{what}.quant_method = {v} is not a string"))?,
        None if what == "compression_config" => "compressed-tensors",
        None => bail!("{what} has no `quant_method`"),
    };
    match method {
        "gptq" => read_gptq(qc, what).map(Some),
        "awq" => read_awq(qc, what).map(Some),
        "compressed-tensors" => read_ct(qc, what).map(Some),
        other => bail!(
            "{what}.quant_method = {other:?} is not supported (supported: \"gptq\", \"awq\", \"compressed-tensors\")"
        ),
    }
}

fn read_gptq(qc: &Value, what: &str) -> Result<QuantScheme> {
    let bits = bits_field(qc, what, &["bits"], &[4, 8])?;
    let granularity = group_field(qc, what, &["group_size"])?;
    let desc_act = bool_field(qc, what, "desc_act", false)?;
    let symmetric = bool_field(qc, what, "sym", true)?;
    for key in ["is_marlin_format"] {
        if bool_field(qc, what, key, false)? {
            bail!("{what}.{key} = true: Marlin-repacked GPTQ checkpoints are not supported");
        }
    }
    let fmt_key = ["checkpoint_format", "format"]
        .into_iter()
        .find(|k| field(qc, k).is_some());
    let zero_minus_one = match fmt_key {
        None => true,
        Some(key) => {
            let v = &qc[key];
            match v.as_str() {
                Some("gptq") => true,
                Some("gptq_v2") => false,
                _ => bail!("{what}.{key} = {v} is not supported (supported: \"gptq\", \"gptq_v2\")"),
            }
        }
    };
    let mut only = Vec::new();
    if let Some(v) = field(qc, "modules_in_block_to_quantize") {
        let lists = v
            .as_array()
            .with_context(|| format!("{what}.modules_in_block_to_quantize = {v} is not a list"))?;
        for l in lists {
            let inner = match l {
                Value::Array(a) => a.clone(),
                other => vec![other.clone()],
            };
            for x in inner {
                let s = x
                    .as_str()
                    .with_context(|| format!("{what}.modules_in_block_to_quantize holds {x}, not a module name"))?;
                only.push(Pattern::Suffix(s.to_owned()));
            }
        }
    }
    Ok(QuantScheme {
        format: QuantFormat::Gptq {
            desc_act,
            zero_minus_one,
        },
        bits,
        granularity,
        symmetric,
        activations_quantized: false,
        lm_head_quantized: bool_field(qc, what, "lm_head", false)?,
        ignore: vec![],
        only,
    })
}

fn read_awq(qc: &Value, what: &str) -> Result<QuantScheme> {
    let version = match field(qc, "version") {
        None => "gemm".to_owned(),
        Some(v) => v
            .as_str()
            .with_context(|| format!("{what}.version = {v} is not a string"))?
            .to_ascii_lowercase(),
    };
    if version != "gemm" {
        bail!(
            "{what}.version = {version:?} is not supported: only AWQ \"gemm\" checkpoints load \
             (\"gemv\", \"gemv_fast\", \"marlin\", \"exllama\", \"ipex\" pack their weights differently)"
        );
    }
    let bits = bits_field(qc, what, &["bits", "w_bit"], &[4])?;
    let granularity = group_field(qc, what, &["group_size", "q_group_size"])?;
    if !bool_field(qc, what, "zero_point", true)? {
        bail!("{what}.zero_point = false is not supported (AWQ GEMM checkpoints with zero points only)");
    }
    let ignore = names(qc, what, "modules_to_not_convert")?
        .into_iter()
        .map(Pattern::Substring)
        .collect();
    Ok(QuantScheme {
        format: QuantFormat::AwqGemm,
        bits,
        granularity,
        symmetric: false,
        activations_quantized: false,
        lm_head_quantized: false,
        ignore,
        only: vec![],
    })
}

fn read_ct(qc: &Value, what: &str) -> Result<QuantScheme> {
    if let Some(v) = field(qc, "kv_cache_scheme") {
        bail!("{what}.kv_cache_scheme = {v}: a quantized KV cache is not supported");
    }
    if let Some(sp) = field(qc, "sparsity_config") {
        if let Some(f) = field(sp, "format") {
            if f.as_str() != Some("dense") {
                bail!("{what}.sparsity_config.format = {f}: sparse compressed-tensors checkpoints are not supported");
            }
        }
    }
    let groups = field(qc, "config_groups")
        .and_then(Value::as_object)
        .with_context(|| format!("{what} has no `config_groups` object"))?;
    if groups.len() != 1 {
        bail!(
            "{what}.config_groups has {} groups ({:?}); only one quantization group is supported",
            groups.len(),
            groups.keys().collect::<Vec<_>>()
        );
    }
    let (gname, group) = groups.iter().next().unwrap();
    let gw = format!("{what}.config_groups.{gname}");
    let targets = names(group, &gw, "targets")?;
    if targets != ["Linear"] {
        bail!("{gw}.targets = {targets:?} is not supported (only [\"Linear\"])");
    }
    let format = field(group, "format")
        .or_else(|| field(qc, "format"))
        .with_context(|| format!("{what} has no `format`"))?;
    let format_str = format.as_str().unwrap_or_default();
    let weights = field(group, "weights").with_context(|| format!("{gw} has no `weights`"))?;
    let ww = format!("{gw}.weights");
    if let Some(t) = field(weights, "type") {
        if t.as_str() != Some("int") {
            bail!("{ww}.type = {t} is not supported (only \"int\")");
        }
    }
    if bool_field(weights, &ww, "dynamic", false)? {
        bail!("{ww}.dynamic = true is not supported (weights need stored scales)");
    }
    if let Some(a) = field(weights, "actorder") {
        match a {
            Value::Bool(false) => {}
            Value::String(s) if s == "weight" || s == "static" => {}
            _ => bail!(
                "{ww}.actorder = {a} is not supported (it needs weight_g_idx; only null, \"weight\" or \"static\")"
            ),
        }
    }
    let (fmt, allowed): (QuantFormat, &[u8]) = match format_str {
        "pack-quantized" => (QuantFormat::CtPackQuantized, &[4, 8]),
        "int-quantized" | "naive-quantized" => (QuantFormat::CtIntQuantized, &[4, 8]),
        _ => bail!(
            "{what}.format = {format} is not supported (supported: \"pack-quantized\", \"int-quantized\", \
             \"naive-quantized\")"
        ),
    };
    let bits = bits_field(weights, &ww, &["num_bits"], allowed)?;
    if fmt == QuantFormat::CtIntQuantized && format_str == "int-quantized" && bits != 8 {
        bail!("{ww}.num_bits = {bits}: int-quantized stores 8-bit weights only");
    }
    let strategy = field(weights, "strategy")
        .and_then(Value::as_str)
        .with_context(|| format!("{ww} has no `strategy`"))?;
    let granularity = match strategy {
        "channel" => Granularity::Channel,
        "tensor" => Granularity::Tensor,
        "group" => match group_field(weights, &ww, &["group_size"])? {
            Granularity::Channel => Granularity::Channel,
            g => g,
        },
        other => bail!("{ww}.strategy = {other:?} is not supported (supported: \"channel\", \"group\", \"tensor\")"),
    };
    let mut ignore = Vec::new();
    for s in names(qc, what, "ignore")? {
        match s.strip_prefix("re:") {
            Some(r) => {
                check_regex(r.as_bytes()).with_context(|| format!("{what}.ignore: pattern {s:?}"))?;
                ignore.push(Pattern::Regex(r.to_owned()));
            }
            None => ignore.push(Pattern::Exact(s)),
        }
    }
    let activations_quantized = field(group, "input_activations").is_some();
    Ok(QuantScheme {
        format: fmt,
        bits,
        granularity,
        symmetric: bool_field(weights, &ww, "symmetric", true)?,
        activations_quantized,
        lm_head_quantized: true,
        ignore,
        only: vec![],
    })
}

// A small regex subset for compressed-tensors `ignore: ["re:..."]` patterns (Python
// `re.match`: anchored at the start, not the end unless `$`): literal characters, `\`
// escapes, `.`, the quantifiers `*`, `+`, `?` on one atom, and a final `$`. Anything else
// (groups, alternation, classes) is refused when the config is read.

fn check_regex(r: &[u8]) -> Result<()> {
    for (i, c) in r.iter().enumerate() {
        match c {
            b'(' | b')' | b'|' | b'[' | b']' | b'{' | b'}' | b'^' => {
                bail!(
                    "regex feature `{}` is not supported (only literals, `.`, `*`, `+`, `?`, `\\` escapes, `$`)",
                    *c as char
                )
            }
            b'$' if i + 1 != r.len() => bail!("`$` only at the end is supported"),
            _ => {}
        }
    }
    Ok(())
}

/// One atom at the start of `r`: (matches byte c?, length of the atom in `r`).
fn atom(r: &[u8]) -> (Box<dyn Fn(u8) -> bool>, usize) {
    match r[0] {
        b'.' => (Box::new(|_| true), 1),
        b'\\' if r.len() > 1 => {
            let lit = r[1];
            (Box::new(move |c| c == lit), 2)
        }
        lit => (Box::new(move |c| c == lit), 1),
    }
}

fn regex_match_start(r: &[u8], s: &[u8]) -> bool {
    if r.is_empty() {
        return true;
    }
    if r == b"$" {
        return s.is_empty();
    }
    let (m, len) = atom(r);
    let rest = &r[len..];
    match rest.first() {
        Some(b'*') | Some(b'+') | Some(b'?') => {
            let q = rest[0];
            let after = &rest[1..];
            let min = usize::from(q == b'+');
            let max = if q == b'?' { 1 } else { usize::MAX };
            let mut i = 0;
            loop {
                if i >= min && regex_match_start(after, &s[i..]) {
                    return true;
                }
                if i >= max || i >= s.len() || !m(s[i]) {
                    return false;
                }
                i += 1;
            }
        }
        _ => !s.is_empty() && m(s[0]) && regex_match_start(rest, &s[1..]),
    }
}
