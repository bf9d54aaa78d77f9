//! HuJSON (JSON with `//` and `/* */` comments and trailing commas), parsed into values that
//! remember their line and column, so every later error can point at the text.
//!
//! Limits keep hostile input cheap: at most [`MAX_LEN`] bytes and [`MAX_DEPTH`] levels of
//! nesting. Duplicate object keys are an error (a policy that says two things is ambiguous).

use std::fmt;

/// Largest policy file.
pub const MAX_LEN: usize = 1 << 20;
/// Deepest nesting.
pub const MAX_DEPTH: usize = 64;

/// A 1-based line and column (in characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Hash)]
pub struct Pos {
    /// Line, from 1.
    pub line: u32,
    /// Column, from 1.
    pub col: u32,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

/// A value with the position where it starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Spanned<T> {
    /// Where the value starts.
    pub pos: Pos,
    /// The value.
    pub value: T,
}

/// A parsed value.
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    /// `null`
    Null,
    /// `true` / `false`
    Bool(bool),
    /// A number, as written.
    Number(String),
    /// A string.
    String(String),
    /// An array.
    Array(Vec<Spanned<Self>>),
    /// An object, in file order.
    Object(Vec<(Spanned<String>, Spanned<Self>)>),
}

impl Json {
    /// The value as `serde_json` holds it (numbers as written when they parse; positions
    /// dropped).
    pub fn to_serde(&self) -> serde_json::Value {
        match self {
            Self::Null => serde_json::Value::Null,
            Self::Bool(b) => serde_json::Value::Bool(*b),
            Self::Number(n) => serde_json::from_str(n).unwrap_or(serde_json::Value::Null),
            Self::String(s) => serde_json::Value::String(s.clone()),
            Self::Array(a) => {
                serde_json::Value::Array(a.iter().map(|v| v.value.to_serde()).collect())
            }
            Self::Object(o) => serde_json::Value::Object(
                o.iter()
                    .map(|(k, v)| (k.value.clone(), v.value.to_serde()))
                    .collect(),
            ),
        }
    }

    /// A short name of the value's type, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Null => "null",
            Self::Bool(_) => "a boolean",
            Self::Number(_) => "a number",
            Self::String(_) => "a string",
            Self::Array(_) => "an array",
            Self::Object(_) => "an object",
        }
    }
}

/// A syntax error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    /// Where.
    pub pos: Pos,
    /// What.
    pub message: String,
}

/// Parses a whole document.
pub fn parse(text: &str) -> Result<Spanned<Json>, SyntaxError> {
    if text.len() > MAX_LEN {
        return Err(SyntaxError {
            pos: Pos { line: 1, col: 1 },
            message: format!("the file is larger than {MAX_LEN} bytes"),
        });
    }
    let mut p = Parser {
        chars: text.chars().collect(),
        i: 0,
        line: 1,
        col: 1,
    };
    p.skip_ws()?;
    let v = p.value(0)?;
    p.skip_ws()?;
    if p.i < p.chars.len() {
        return Err(p.err("unexpected text after the end of the document"));
    }
    Ok(v)
}

struct Parser {
    chars: Vec<char>,
    i: usize,
    line: u32,
    col: u32,
}

impl Parser {
    fn pos(&self) -> Pos {
        Pos {
            line: self.line,
            col: self.col,
        }
    }

    fn err(&self, message: impl Into<String>) -> SyntaxError {
        SyntaxError {
            pos: self.pos(),
            message: message.into(),
        }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.i).copied()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.chars.get(self.i).copied()?;
        self.i += 1;
        if c == '\n' {
            self.line += 1;
            self.col = 1;
        } else {
            self.col += 1;
        }
        Some(c)
    }

    fn skip_ws(&mut self) -> Result<(), SyntaxError> {
        loop {
            match self.peek() {
                Some(' ' | '\t' | '\n' | '\r' | '\u{feff}') => {
                    self.bump();
                }
                Some('/') => {
                    let start = self.pos();
                    self.bump();
                    match self.bump() {
                        Some('/') => {
                            while let Some(c) = self.peek() {
                                if c == '\n' {
                                    break;
                                }
                                self.bump();
                            }
                        }
                        Some('*') => loop {
                            match self.bump() {
                                Some('*') if self.peek() == Some('/') => {
                                    self.bump();
                                    break;
                                }
                                Some(_) => {}
                                None => {
                                    return Err(SyntaxError {
                                        pos: start,
                                        message: "unterminated /* comment".into(),
                                    });
                                }
                            }
                        },
                        _ => {
                            return Err(SyntaxError {
                                pos: start,
                                message: "expected // or /* to start a comment".into(),
                            });
                        }
                    }
                }
                _ => return Ok(()),
            }
        }
    }

    fn value(&mut self, depth: usize) -> Result<Spanned<Json>, SyntaxError> {
        if depth > MAX_DEPTH {
            return Err(self.err(format!("nesting deeper than {MAX_DEPTH} levels")));
        }
        let pos = self.pos();
        let value = match self.peek() {
            Some('{') => self.object(depth)?,
            Some('[') => self.array(depth)?,
            Some('"') => Json::String(self.string()?),
            Some('t') => self.word("true", Json::Bool(true))?,
            Some('f') => self.word("false", Json::Bool(false))?,
            Some('n') => self.word("null", Json::Null)?,
            Some(c) if c == '-' || c.is_ascii_digit() => self.number()?,
            Some(c) => return Err(self.err(format!("unexpected {c:?}; expected a value"))),
            None => return Err(self.err("unexpected end of file; expected a value")),
        };
        Ok(Spanned { pos, value })
    }

    fn word(&mut self, w: &str, v: Json) -> Result<Json, SyntaxError> {
        let start = self.pos();
        for expected in w.chars() {
            if self.bump() != Some(expected) {
                return Err(SyntaxError {
                    pos: start,
                    message: format!("unknown word; expected {w}"),
                });
            }
        }
        Ok(v)
    }

    fn number(&mut self) -> Result<Json, SyntaxError> {
        let start = self.pos();
        let mut s = String::new();
        while let Some(c) = self.peek() {
            if c.is_ascii_digit() || matches!(c, '-' | '+' | '.' | 'e' | 'E') {
                s.push(c);
                self.bump();
            } else {
                break;
            }
        }
        if s.parse::<f64>().is_err() {
            return Err(SyntaxError {
                pos: start,
                message: format!("invalid number {s:?}"),
            });
        }
        Ok(Json::Number(s))
    }

    fn string(&mut self) -> Result<String, SyntaxError> {
        let start = self.pos();
        self.bump();
        let mut s = String::new();
        loop {
            match self.bump() {
                Some('"') => return Ok(s),
                Some('\\') => {
                    let esc_pos = self.pos();
                    match self.bump() {
                        Some('"') => s.push('"'),
                        Some('\\') => s.push('\\'),
                        Some('/') => s.push('/'),
                        Some('b') => s.push('\u{8}'),
                        Some('f') => s.push('\u{c}'),
                        Some('n') => s.push('\n'),
                        Some('r') => s.push('\r'),
                        Some('t') => s.push('\t'),
                        Some('u') => {
                            let mut code = 0u32;
                            for _ in 0..4 {
                                let d = self.bump().and_then(|c| c.to_digit(16)).ok_or(
                                    SyntaxError {
                                        pos: esc_pos,
                                        message: "invalid \\u escape".into(),
                                    },
                                )?;
                                code = code * 16 + d;
                            }
                            s.push(char::from_u32(code).unwrap_or('\u{fffd}'));
                        }
                        _ => {
                            return Err(SyntaxError {
                                pos: esc_pos,
                                message: "invalid escape in string".into(),
                            });
                        }
                    }
                }
                Some('\n') | None => {
                    return Err(SyntaxError {
                        pos: start,
                        message: "unterminated string".into(),
                    });
                }
                Some(c) => s.push(c),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<Json, SyntaxError> {
        self.bump();
        let mut items = Vec::new();
        loop {
            self.skip_ws()?;
            if self.peek() == Some(']') {
                self.bump();
                return Ok(Json::Array(items));
            }
            items.push(self.value(depth + 1)?);
            self.skip_ws()?;
            match self.peek() {
                Some(',') => {
                    self.bump();
                }
                Some(']') => {}
                _ => return Err(self.err("expected , or ] in an array")),
            }
        }
    }

    fn object(&mut self, depth: usize) -> Result<Json, SyntaxError> {
        self.bump();
        let mut fields: Vec<(Spanned<String>, Spanned<Json>)> = Vec::new();
        loop {
            self.skip_ws()?;
            match self.peek() {
                Some('}') => {
                    self.bump();
                    return Ok(Json::Object(fields));
                }
                Some('"') => {}
                _ => return Err(self.err("expected a quoted key or }")),
            }
            let key_pos = self.pos();
            let key = self.string()?;
            if fields.iter().any(|(k, _)| k.value == key) {
                return Err(SyntaxError {
                    pos: key_pos,
                    message: format!("duplicate key {key:?}"),
                });
            }
            self.skip_ws()?;
            if self.bump() != Some(':') {
                return Err(self.err("expected : after a key"));
            }
            self.skip_ws()?;
            let value = self.value(depth + 1)?;
            fields.push((
                Spanned {
                    pos: key_pos,
                    value: key,
                },
                value,
            ));
            self.skip_ws()?;
            match self.peek() {
                Some(',') => {
                    self.bump();
                }
                Some('}') => {}
                _ => return Err(self.err("expected , or } in an object")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn comments_and_trailing_commas_are_accepted() {
        let v = parse(
            "// policy\n{\n  /* groups */ \"a\": [1, 2,],\n  \"b\": {\"c\": \"d\",}, // end\n}\n",
        )
        .unwrap();
        let Json::Object(fields) = v.value else {
            panic!()
        };
        assert_eq!(fields[0].0.value, "a");
        assert_eq!(fields[0].0.pos, Pos { line: 3, col: 16 });
        assert_eq!(fields[1].1.pos, Pos { line: 4, col: 8 });
    }

    #[test]
    fn errors_point_at_the_problem() {
        let e = parse("{\n  \"a\": [1 2]\n}").unwrap_err();
        assert_eq!(e.pos, Pos { line: 2, col: 11 });
        assert!(e.message.contains("expected , or ]"));
        let e = parse("{\"a\": 1, \"a\": 2}").unwrap_err();
        assert_eq!(
            (e.pos, e.message.as_str()),
            (Pos { line: 1, col: 10 }, "duplicate key \"a\"")
        );
        assert!(
            parse("{\"a\": \"open")
                .unwrap_err()
                .message
                .contains("unterminated")
        );
        assert!(parse("/* x").unwrap_err().message.contains("unterminated"));
        assert!(
            parse("{} {}")
                .unwrap_err()
                .message
                .contains("after the end")
        );
        assert!(
            parse(&"[".repeat(100))
                .unwrap_err()
                .message
                .contains("nesting")
        );
    }

    #[test]
    fn strings_unescape() {
        let v = parse(r#""a\"b\u0041\n""#).unwrap();
        assert_eq!(v.value, Json::String("a\"bA\n".into()));
    }

    proptest! {
        #[test]
        fn parsing_arbitrary_text_never_panics(s in "\\PC{0,200}") {
            let _ = parse(&s);
        }

        #[test]
        fn parsing_json_like_text_never_panics(s in r#"[\[\]{}",:0-9a-z /*\n\\-]{0,120}"#) {
            let _ = parse(&s);
        }
    }
}
