//! The scheduling policy's knobs and their defaults.

/// Limits of one replica's batch and steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Sequences running together (decoding or reading their prompts).
    pub max_batch_size: usize,
    /// Prompt tokens of one sequence per step.
    pub prefill_chunk: usize,
    /// Prompt tokens of all sequences together per step: bounds how much a step of
    /// decoding sequences slows down while long prompts are read.
    pub prefill_budget: usize,
}

impl SchedulerConfig {
    pub const DEFAULT_MAX_BATCH_SIZE: usize = 128;
    pub const DEFAULT_PREFILL_CHUNK: usize = 256;
    pub const DEFAULT_PREFILL_BUDGET: usize = 512;

    /// Says which limit is unusable, if one is.
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in [
            ("max batch size", self.max_batch_size),
            ("prefill chunk", self.prefill_chunk),
            ("prefill budget", self.prefill_budget),
        ] {
            if v == 0 {
                return Err(format!("the {name} must be at least 1"));
            }
        }
        Ok(())
    }
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_batch_size: Self::DEFAULT_MAX_BATCH_SIZE,
            prefill_chunk: Self::DEFAULT_PREFILL_CHUNK,
            prefill_budget: Self::DEFAULT_PREFILL_BUDGET,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_limits_are_named() {
        assert!(SchedulerConfig::default().validate().is_ok());
        let c = SchedulerConfig {
            prefill_budget: 0,
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().contains("prefill budget"));
    }
}
