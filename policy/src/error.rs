//! Diagnostics: every problem in a policy file, with its position.

use std::fmt;

use crate::hujson::Pos;

/// One problem, at a line and column of the policy file.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Diagnostic {
    /// Where.
    pub pos: Pos,
    /// What is wrong (lowercase, no trailing period).
    pub message: String,
}

impl Diagnostic {
    pub(crate) fn new(pos: Pos, message: impl Into<String>) -> Self {
        Self {
            pos,
            message: message.into(),
        }
    }
}

/// Why a policy was refused: all problems found, in file order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PolicyError {
    /// The file name used in messages.
    pub file: String,
    /// Every problem.
    pub diagnostics: Vec<Diagnostic>,
}

impl PolicyError {
    /// One `file:line:col: message` line per problem.
    pub fn lines(&self) -> Vec<String> {
        self.diagnostics
            .iter()
            .map(|d| format!("{}:{}:{}: {}", self.file, d.pos.line, d.pos.col, d.message))
            .collect()
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.lines().join("\n"))
    }
}
