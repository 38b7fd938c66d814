//! Newline-delimited JSON framing shared by QMP and the guest agent.
//!
//! Both protocols send one JSON document per line. The decoder enforces a
//! maximum line length (a hostile or broken peer cannot make us buffer without
//! bound) and a maximum nesting depth (a deeply nested document cannot
//! overflow the stack), and it can skip to the `0xFF` delimiter that
//! `guest-sync-delimited` uses to resynchronise a guest-agent stream.

use bytes::{Buf, BytesMut};
use serde_json::Value;
use tokio_util::codec::Decoder;

use crate::error::{Error, Result};

/// Default maximum line length: 64 MiB. A `query-named-block-nodes` reply for a
/// 1000-layer chain is a few MiB, so this leaves ample room while bounding memory.
pub const DEFAULT_MAX_LINE: usize = 64 << 20;

/// Default maximum JSON nesting depth. `query-block` nests one `backing-image`
/// per layer (about three levels each), so 1000 layers need roughly 3000 levels.
pub const DEFAULT_MAX_DEPTH: usize = 4096;

/// Splits a byte stream into lines, bounded in length.
#[derive(Debug)]
pub struct LineCodec {
    max_line: usize,
    /// Bytes already searched for a newline, so each byte is scanned once.
    scanned: usize,
    /// Discard everything up to and including the next `0xFF` byte.
    skip_to_delimiter: bool,
}

impl LineCodec {
    pub fn new(max_line: usize) -> Self {
        LineCodec {
            max_line,
            scanned: 0,
            skip_to_delimiter: false,
        }
    }

    /// Drop input until the next `0xFF` byte (guest-agent resync).
    pub fn skip_to_delimiter(&mut self) {
        self.skip_to_delimiter = true;
    }
}

impl Decoder for LineCodec {
    type Item = BytesMut;
    type Error = Error;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<BytesMut>> {
        loop {
            if self.skip_to_delimiter {
                match buf.iter().position(|&b| b == 0xFF) {
                    Some(pos) => {
                        buf.advance(pos + 1);
                        self.skip_to_delimiter = false;
                        self.scanned = 0;
                    }
                    None => {
                        buf.clear();
                        return Ok(None);
                    }
                }
            }
            match buf[self.scanned..].iter().position(|&b| b == b'\n') {
                Some(pos) => {
                    let end = self.scanned + pos;
                    self.scanned = 0;
                    if end > self.max_line {
                        return Err(Error::LineTooLong {
                            limit: self.max_line,
                        });
                    }
                    let mut line = buf.split_to(end + 1);
                    line.truncate(end);
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    return Ok(Some(line));
                }
                None => {
                    if buf.len() > self.max_line {
                        return Err(Error::LineTooLong {
                            limit: self.max_line,
                        });
                    }
                    self.scanned = buf.len();
                    return Ok(None);
                }
            }
        }
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<BytesMut>> {
        if let Some(line) = self.decode(buf)? {
            return Ok(Some(line));
        }
        if buf.iter().all(u8::is_ascii_whitespace) {
            buf.clear();
            return Ok(None);
        }
        let partial = buf.len();
        buf.clear();
        Err(Error::Protocol(format!(
            "connection closed in the middle of a message ({partial} bytes without a newline)"
        )))
    }
}

/// Parses one line into JSON, refusing documents nested deeper than `max_depth`.
///
/// Depth is checked by a linear pre-scan before parsing, and a document deeper
/// than a few dozen levels is parsed on a growable stack, so neither a hostile
/// peer nor a legitimately deep `query-block` reply can overflow the thread's
/// stack.
pub fn parse_json(line: &[u8], max_depth: usize) -> Result<Value> {
    let depth = nesting_depth(line);
    if depth > max_depth {
        return Err(Error::Protocol(format!(
            "message nested {depth} levels deep (limit {max_depth})"
        )));
    }
    let parsed = if depth <= SHALLOW {
        // Most messages (every reply to a simple query, every event) are a few
        // levels deep: serde_json's own parser, whose recursion limit (128) they
        // cannot reach, is safe on any stack, and skipping the stack check per
        // nested value makes the common reply cheaper.
        serde_json::from_slice(line)
    } else {
        let mut de = serde_json::Deserializer::from_slice(line);
        de.disable_recursion_limit();
        serde::Deserialize::deserialize(serde_stacker::Deserializer::new(&mut de))
            .and_then(|v: Value| de.end().map(|()| v))
    };
    parsed.map_err(|e| Error::Protocol(format!("malformed JSON: {e}: {}", preview(line))))
}

/// Nesting depth up to which [`parse_json`] parses on the current stack.
const SHALLOW: usize = 64;

/// The deepest bracket nesting in a JSON text, ignoring brackets inside strings.
fn nesting_depth(text: &[u8]) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in text {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// The start of a line, for error messages that show what the peer sent.
pub fn preview(line: &[u8]) -> String {
    const MAX: usize = 80;
    let text = String::from_utf8_lossy(&line[..line.len().min(MAX)]);
    let text = text.trim_end();
    if line.len() > MAX {
        format!("{text:?}...")
    } else {
        format!("{text:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(codec: &mut LineCodec, input: &[u8]) -> Vec<Result<Option<BytesMut>>> {
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        loop {
            let r = codec.decode(&mut buf);
            let stop = !matches!(r, Ok(Some(_)));
            out.push(r);
            if stop {
                return out;
            }
        }
    }

    #[test]
    fn splits_lines_and_skips_blank_ones() {
        let mut c = LineCodec::new(100);
        let got = decode_all(&mut c, b"{\"a\":1}\r\n\n  \n{\"b\":2}\npartial");
        let lines: Vec<_> = got
            .into_iter()
            .filter_map(|r| r.unwrap())
            .map(|l| String::from_utf8(l.to_vec()).unwrap())
            .collect();
        assert_eq!(lines, vec!["{\"a\":1}\r", "{\"b\":2}"]);
    }

    #[test]
    fn line_over_the_limit_is_an_error_even_without_newline() {
        let mut c = LineCodec::new(10);
        let mut buf = BytesMut::from(&b"0123456789012"[..]);
        assert!(matches!(
            c.decode(&mut buf),
            Err(Error::LineTooLong { limit: 10 })
        ));
        let mut c = LineCodec::new(10);
        let mut buf = BytesMut::from(&b"0123456789012\n"[..]);
        assert!(matches!(
            c.decode(&mut buf),
            Err(Error::LineTooLong { limit: 10 })
        ));
    }

    #[test]
    fn eof_inside_a_line_is_a_protocol_error() {
        let mut c = LineCodec::new(100);
        let mut buf = BytesMut::from(&b"{\"ret"[..]);
        assert!(matches!(c.decode_eof(&mut buf), Err(Error::Protocol(_))));
    }

    #[test]
    fn skips_to_the_guest_agent_delimiter() {
        let mut c = LineCodec::new(100);
        c.skip_to_delimiter();
        let mut buf = BytesMut::from(&b"stale\n{\"x\":1}\n\xff{\"return\": 7}\n"[..]);
        let line = c.decode(&mut buf).unwrap().unwrap();
        assert_eq!(&line[..], b"{\"return\": 7}");
    }

    #[test]
    fn depth_limit_and_deep_documents() {
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n)).into_bytes();
        assert!(parse_json(&deep(3000), 4096).is_ok());
        assert!(matches!(
            parse_json(&deep(5000), 4096),
            Err(Error::Protocol(_))
        ));
        // Brackets inside strings do not count.
        assert_eq!(nesting_depth(br#"{"a":"[[[[\"[["}"#), 1);
    }

    #[test]
    fn malformed_json_names_the_input() {
        let err = parse_json(b"{\"return\": }", 10).unwrap_err().to_string();
        assert!(err.contains("malformed JSON"), "{err}");
        assert!(err.contains("return"), "{err}");
    }
}
