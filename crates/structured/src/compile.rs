//! Constraints, the limits on them, and their compilation for the served tokenizer.

use crate::follow::Follower;
use crate::vocab::tok_env;
use anyhow::Result;
use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory, TokenParser};
use serde_json::{json, Value};
use sirocco_tokenizer::Tokenizer;
use std::fmt;
use std::time::Instant;

/// The longest constraint text accepted (a schema's JSON, a regex, a grammar, all
/// choices together), in bytes.
pub const MAX_CONSTRAINT_BYTES: usize = 256 << 10;
/// The most choices a choice constraint may list.
pub const MAX_CHOICES: usize = 4096;
/// Grammar symbols a compiled constraint may hold (llguidance counts them); bounds
/// the memory of one request's grammar.
const MAX_GRAMMAR_SIZE: usize = 200_000;
/// Lexer work allowed while compiling (llguidance's fuel: about 50k per ms), so that
/// no constraint holds the router for more than a few tens of milliseconds.
const COMPILE_FUEL: u64 = 1_000_000;
/// The longest compile error passed back to a client.
const MAX_ERROR_CHARS: usize = 400;

/// What an output must be.
#[derive(Clone, Debug, PartialEq)]
pub enum Constraint {
    /// JSON that validates against this schema.
    JsonSchema(Value),
    /// Text that the regular expression matches, whole.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A sentence of this grammar, in llguidance's Lark syntax.
    Lark(String),
}

/// A constraint's kind, as metrics label it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    JsonSchema,
    Regex,
    Choice,
    Grammar,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::JsonSchema, Kind::Regex, Kind::Choice, Kind::Grammar];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::JsonSchema => "json_schema",
            Kind::Regex => "regex",
            Kind::Choice => "choice",
            Kind::Grammar => "grammar",
        }
    }
}

impl Constraint {
    pub fn kind(&self) -> Kind {
        match self {
            Constraint::JsonSchema(_) => Kind::JsonSchema,
            Constraint::Regex(_) => Kind::Regex,
            Constraint::Choice(_) => Kind::Choice,
            Constraint::Lark(_) => Kind::Grammar,
        }
    }

    /// The constraint as llguidance's grammar, after the checks that need no
    /// tokenizer.
    fn grammar(&self) -> Result<TopLevelGrammar, CompileError> {
        let size = match self {
            Constraint::JsonSchema(v) => v.to_string().len(),
            Constraint::Regex(s) | Constraint::Lark(s) => s.len(),
            Constraint::Choice(c) => c.iter().map(|s| s.len() + 1).sum(),
        };
        if size > MAX_CONSTRAINT_BYTES {
            return Err(CompileError(format!(
                "the constraint is {size} bytes; at most {MAX_CONSTRAINT_BYTES} are accepted"
            )));
        }
        Ok(match self {
            Constraint::JsonSchema(schema) => {
                if !(schema.is_object() || schema.is_boolean()) {
                    return Err(CompileError("a JSON Schema is an object (or true/false)".into()));
                }
                TopLevelGrammar::from_json_schema(compact(schema.clone()))
            }
            Constraint::Regex(rx) => {
                // llguidance takes a few constructs the usual syntax refuses, and vice
                // versa; a regex both read alike is what a client can rely on.
                regex_syntax::Parser::new()
                    .parse(rx)
                    .map_err(|e| CompileError(format!("invalid regular expression: {}", first_line(&e.to_string()))))?;
                TopLevelGrammar::from_regex(rx)
            }
            Constraint::Choice(choices) => {
                if choices.is_empty() {
                    return Err(CompileError("the list of choices is empty".into()));
                }
                if choices.len() > MAX_CHOICES {
                    return Err(CompileError(format!(
                        "{} choices; at most {MAX_CHOICES} are accepted",
                        choices.len()
                    )));
                }
                if choices.iter().any(|c| c.is_empty()) {
                    return Err(CompileError("a choice is empty".into()));
                }
                let alternatives: Vec<String> = choices.iter().map(|c| regex_syntax::escape(c)).collect();
                TopLevelGrammar::from_regex(&format!("(?:{})", alternatives.join("|")))
            }
            Constraint::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
        })
    }
}

/// JSON output without free whitespace: a model (a random-weight one above all)
/// could otherwise spend its whole budget on spaces and newlines between tokens.
/// A schema's own `x-guidance` options win.
fn compact(schema: Value) -> Value {
    match schema {
        Value::Object(mut m) => {
            m.entry("x-guidance").or_insert_with(
                || json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
            );
            Value::Object(m)
        }
        Value::Bool(true) => compact(json!({})),
        other => other,
    }
}

/// One line of an error for a client: the line that names the error when the
/// message has one (a regex error draws the pattern over several lines), else the
/// first.
fn first_line(s: &str) -> String {
    let mut lines = s.lines().map(str::trim).filter(|l| !l.is_empty());
    let line = s
        .lines()
        .find_map(|l| l.trim().strip_prefix("error: "))
        .or_else(|| lines.next())
        .unwrap_or(s);
    line.chars().take(MAX_ERROR_CHARS).collect()
}

/// Why a constraint was refused: said so that the client can fix it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompileError(pub String);

impl fmt::Display for CompileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CompileError {}

/// Compiles constraints for one served tokenizer (built once: it indexes the
/// vocabulary).
pub struct Grammars {
    factory: ParserFactory,
}

impl fmt::Debug for Grammars {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Grammars").finish_non_exhaustive()
    }
}

impl Grammars {
    /// Grammars over `tokenizer`'s vocabulary, for a model of `model_vocab` ids.
    pub fn new(tokenizer: &Tokenizer, model_vocab: usize) -> Result<Self> {
        let env = tok_env(tokenizer, model_vocab)?;
        let mut factory = ParserFactory::new_simple(&env)?;
        factory.quiet();
        let limits = factory.limits_mut();
        limits.max_grammar_size = MAX_GRAMMAR_SIZE;
        limits.initial_lexer_fuel = COMPILE_FUEL;
        limits.verbose_errors = false;
        Ok(Grammars { factory })
    }

    /// Compiles `c`, or says why it cannot be.
    pub fn compile(&self, c: &Constraint) -> Result<Compiled, CompileError> {
        let grammar = c.grammar()?;
        let started = Instant::now();
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| CompileError(first_line(&e.to_string())))?;
        let mut compiled = Compiled {
            parser,
            kind: c.kind(),
            compile_secs: started.elapsed().as_secs_f64(),
        };
        // A grammar that compiles but whose language is empty (an unsatisfiable
        // schema, say) would fail on the first token: refuse it now instead.
        compiled.follow().allowed().map_err(|e| CompileError(first_line(&e)))?;
        compiled.compile_secs = started.elapsed().as_secs_f64();
        Ok(compiled)
    }
}

/// A compiled constraint, from which each sequence that must obey it starts.
#[derive(Clone)]
pub struct Compiled {
    parser: TokenParser,
    kind: Kind,
    compile_secs: f64,
}

impl fmt::Debug for Compiled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Compiled")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl Compiled {
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Seconds compiling took.
    pub fn compile_secs(&self) -> f64 {
        self.compile_secs
    }

    /// A sequence's own progress through the grammar, from its start.
    pub fn follow(&self) -> Follower {
        Follower::new(Matcher::new(Ok(self.parser.deep_clone())))
    }
}
