//! How an error quotes a value the caller sent: in full when it is short,
//! else a short prefix and its length. An error that echoed a megabyte
//! value whole would itself be refused by the caller's HTTP/2 header
//! limits, and the caller would see that refusal instead of ours.

use std::fmt;

/// Characters of a value an error quotes before it cuts.
pub const QUOTED_CHARS: usize = 48;

/// A value as an error message shows it: `"abc"`, or `"abcd…" (1048576
/// bytes)` when it is longer than [`QUOTED_CHARS`] characters.
pub struct Quoted<'a>(pub &'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.char_indices().nth(QUOTED_CHARS) {
            None => write!(f, "{:?}", self.0),
            Some((cut, _)) => {
                let shown = format!("{:?}", &self.0[..cut]);
                let open = shown.strip_suffix('"').unwrap_or(&shown);
                write!(f, "{open}…\" ({} bytes)", self.0.len())
            }
        }
    }
}

/// Shorthand for [`Quoted`].
pub fn quoted(value: &str) -> Quoted<'_> {
    Quoted(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_values_are_quoted_whole() {
        assert_eq!(quoted("10.0.0").to_string(), r#""10.0.0""#);
        assert_eq!(quoted("a\"b").to_string(), r#""a\"b""#);
    }

    #[test]
    fn long_values_are_cut_on_a_character_boundary() {
        let long = "华".repeat(1 << 20);
        let shown = quoted(&long).to_string();
        assert!(shown.len() < 200, "{shown}");
        assert!(shown.starts_with("\"华华"), "{shown}");
        assert!(
            shown.ends_with(&format!("…\" ({} bytes)", long.len())),
            "{shown}"
        );
    }
}
