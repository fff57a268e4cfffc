//! Structured output in the router: the served tokenizer's grammars (built once, on
//! first use or in the background at start), a request's constraint read off the
//! wire, and the allowed tokens of a step's constrained sequences.

use sirocco_proto::v1 as pb;
use sirocco_structured::{Compiled, Constraint, Follower, Grammars};
use sirocco_tokenizer::Tokenizer;
use std::sync::{Arc, OnceLock};

/// Grammars over the served tokenizer, built when first needed: indexing a large
/// vocabulary takes a moment that requests without constraints should not wait for.
#[derive(Clone, Debug)]
pub(crate) struct StructuredOutput {
    tokenizer: Option<Tokenizer>,
    model_vocab: usize,
    grammars: Arc<OnceLock<Result<Grammars, String>>>,
}

impl StructuredOutput {
    pub(crate) fn new(tokenizer: Option<Tokenizer>, model_vocab: usize) -> Self {
        StructuredOutput {
            tokenizer,
            model_vocab,
            grammars: Arc::new(OnceLock::new()),
        }
    }

    /// Builds the grammars on a thread of their own now, so that the first
    /// constrained request does not wait for them.
    pub(crate) fn warm_up(&self) {
        let this = self.clone();
        std::thread::spawn(move || {
            if let Err(e) = this.grammars() {
                tracing::warn!(error = %e, "structured output is unavailable");
            }
        });
    }

    fn grammars(&self) -> Result<&Grammars, String> {
        self.grammars
            .get_or_init(|| {
                let t = self
                    .tokenizer
                    .as_ref()
                    .ok_or("this model has no tokenizer, which structured output needs")?;
                let started = std::time::Instant::now();
                let g = Grammars::new(t, self.model_vocab)
                    .map_err(|e| format!("structured output cannot use this model's tokenizer: {e:#}"))?;
                tracing::info!(secs = started.elapsed().as_secs_f64(), "structured output ready");
                Ok(g)
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Compiles a request's constraint, or says why it cannot be.
    pub(crate) fn compile(&self, c: &Constraint) -> Result<Compiled, String> {
        self.grammars()?.compile(c).map_err(|e| e.0)
    }
}

/// The constraint a gRPC `Constraint` message asks for (`None`: unconstrained).
pub(crate) fn from_pb(c: pb::Constraint) -> Result<Option<Constraint>, String> {
    use pb::constraint::Kind;
    Ok(match c.kind {
        None => None,
        Some(Kind::JsonSchema(text)) => Some(Constraint::JsonSchema(
            serde_json::from_str(&text).map_err(|e| format!("json_schema is not JSON: {e}"))?,
        )),
        Some(Kind::Regex(rx)) => Some(Constraint::Regex(rx)),
        Some(Kind::Choice(c)) => Some(Constraint::Choice(c.choices)),
        Some(Kind::Lark(g)) => Some(Constraint::Lark(g)),
    })
}

/// The allowed tokens of each follower, computed in parallel: each sequence's
/// grammar is its own, so a batch of constrained sequences costs about as much as
/// its slowest one per core.
pub(crate) fn allowed_all(followers: &mut [&mut Follower]) -> Vec<Result<Vec<u32>, String>> {
    use rayon::prelude::*;
    if followers.len() == 1 {
        return vec![followers[0].allowed()];
    }
    followers.par_iter_mut().map(|f| f.allowed()).collect()
}
