//! Errors of a configuration file: every one names the line and column of the offending text,
//! because the person reading it is editing that file.

use std::ops::Range;
use std::path::PathBuf;

/// A configuration that does not parse or breaks a rule. `line` and `column` count from 1;
/// `column` counts characters, not bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {column}: {problem}")]
pub struct ConfigError {
    pub line: usize,
    pub column: usize,
    pub problem: String,
}

impl ConfigError {
    /// The error for the text at byte range `span` of `source`.
    pub(crate) fn at(source: &str, span: Range<usize>, problem: impl Into<String>) -> Self {
        let (line, column) = position(source, span.start);
        ConfigError {
            line,
            column,
            problem: problem.into(),
        }
    }

    /// A TOML or schema error from the `toml` crate. An error without a span (rare: the crate
    /// gives one for syntax and for values) is placed at the end of the text.
    pub(crate) fn from_toml(source: &str, e: &toml::de::Error) -> Self {
        let span = e.span().unwrap_or(source.len()..source.len());
        ConfigError::at(source, span, e.message().trim_end())
    }
}

/// Reading a configuration file failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Invalid { path: PathBuf, source: ConfigError },
}

/// The 1-based line and character column of byte `offset` in `source`; an offset inside a
/// multi-byte character counts as that character.
fn position(source: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(source.len());
    while !source.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &source[..offset];
    let line = 1 + before.matches('\n').count();
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, 1 + before[line_start..].chars().count())
}

#[cfg(test)]
mod tests {
    use super::position;

    #[test]
    fn positions_count_lines_and_characters_from_one() {
        let s = "ab\nçd\n";
        assert_eq!(position(s, 0), (1, 1));
        assert_eq!(position(s, 1), (1, 2));
        assert_eq!(position(s, 3), (2, 1));
        assert_eq!(position(s, 4), (2, 1)); // inside the two-byte 'ç'
        assert_eq!(position(s, 5), (2, 2));
        assert_eq!(position(s, 99), (3, 1));
    }
}
