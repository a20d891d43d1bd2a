//! Splits a QMP byte stream into JSON texts.
//!
//! QMP is a stream of JSON objects, not strictly of lines: QEMU accepts an object spread over
//! several lines and several objects on one line, and clients (`ncat`, the QEMU Python
//! library, Kata's govmm) end each command with a newline. The framer tracks brackets and
//! strings to find where a top-level object ends, so both styles work. Two rules keep it
//! robust against bad input:
//! - a message may be at most `max` bytes; a longer one is answered with one error and the
//!   rest of it is skipped up to the next newline (memory stays bounded, the connection
//!   stays usable);
//! - text outside any object, and a string broken by a newline, is cut at the newline and
//!   handed on as one (malformed) message, so the client gets a parse error instead of
//!   silence.

/// What the framer found in the stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// One complete JSON text (or one malformed line) to parse as a command.
    Message(Vec<u8>),
    /// A message exceeded the limit; the rest of it up to the next newline is skipped.
    TooLong,
}

/// Incremental splitter; feed it whatever `read` returned.
#[derive(Debug)]
pub struct Framer {
    max: usize,
    buf: Vec<u8>,
    depth: usize,
    in_string: bool,
    escaped: bool,
    garbage: bool,
    discarding: bool,
}

impl Framer {
    /// A framer for messages of at most `max` bytes.
    pub fn new(max: usize) -> Self {
        Framer {
            max,
            buf: Vec::new(),
            depth: 0,
            in_string: false,
            escaped: false,
            garbage: false,
            discarding: false,
        }
    }

    fn reset(&mut self) -> Vec<u8> {
        self.depth = 0;
        self.in_string = false;
        self.escaped = false;
        self.garbage = false;
        std::mem::take(&mut self.buf)
    }

    /// Whether a message has started and not ended yet.
    pub fn is_partial(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Consumes `data`, appending every completed frame to `out`.
    pub fn push(&mut self, data: &[u8], out: &mut Vec<Frame>) {
        for &b in data {
            if self.discarding {
                if b == b'\n' {
                    self.discarding = false;
                }
                continue;
            }
            if self.garbage {
                if b == b'\n' {
                    out.push(Frame::Message(self.reset()));
                } else {
                    self.buf.push(b);
                }
            } else if self.depth == 0 {
                match b {
                    b' ' | b'\t' | b'\r' | b'\n' => continue,
                    b'{' | b'[' => {
                        self.depth = 1;
                        self.buf.push(b);
                    }
                    _ => {
                        self.garbage = true;
                        self.buf.push(b);
                    }
                }
            } else {
                self.buf.push(b);
                if self.in_string {
                    if self.escaped {
                        self.escaped = false;
                    } else if b == b'\\' {
                        self.escaped = true;
                    } else if b == b'"' {
                        self.in_string = false;
                    } else if b == b'\n' {
                        // JSON strings cannot hold a raw newline: this line is broken.
                        out.push(Frame::Message(self.reset()));
                    }
                } else {
                    match b {
                        b'"' => self.in_string = true,
                        b'{' | b'[' => self.depth += 1,
                        b'}' | b']' => {
                            self.depth -= 1;
                            if self.depth == 0 {
                                out.push(Frame::Message(self.reset()));
                            }
                        }
                        _ => {}
                    }
                }
            }
            if self.buf.len() > self.max {
                self.reset();
                // A newline just consumed ended nothing; skip to the next one.
                self.discarding = true;
                out.push(Frame::TooLong);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(max: usize, chunks: &[&[u8]]) -> Vec<Frame> {
        let mut f = Framer::new(max);
        let mut out = Vec::new();
        for c in chunks {
            f.push(c, &mut out);
        }
        out
    }

    fn msg(s: &str) -> Frame {
        Frame::Message(s.as_bytes().to_vec())
    }

    #[test]
    fn lines_objects_and_splits() {
        assert_eq!(
            frames(100, &[b"{\"execute\":\"a\"}\n{\"execute\":\"b\"}\n"]),
            [msg("{\"execute\":\"a\"}"), msg("{\"execute\":\"b\"}")]
        );
        // Several per line, one spread over lines and reads, no trailing newline.
        assert_eq!(
            frames(
                100,
                &[b"{\"a\":1}{\"b\"", b":\n[1,{}]}", b"  {\"c\":\"}{\\\"\"}"]
            ),
            [
                msg("{\"a\":1}"),
                msg("{\"b\":\n[1,{}]}"),
                msg("{\"c\":\"}{\\\"\"}")
            ]
        );
        assert!(frames(100, &[b"\r\n \t\n"]).is_empty());
    }

    #[test]
    fn garbage_is_cut_at_newline() {
        assert_eq!(
            frames(100, &[b"hello world\n{}"]),
            [msg("hello world"), msg("{}")]
        );
        assert_eq!(
            frames(100, &[b"{\"a\":\"x\n{}"]),
            [msg("{\"a\":\"x\n"), msg("{}")]
        );
        // Unbalanced braces wait for more input, as QEMU does.
        let mut f = Framer::new(100);
        let mut out = Vec::new();
        f.push(b"{\"a\":\n", &mut out);
        assert!(out.is_empty() && f.is_partial());
    }

    #[test]
    fn too_long_is_reported_once_and_skipped() {
        let mut f = Framer::new(16);
        let mut out = Vec::new();
        f.push(b"{\"execute\":\"", &mut out);
        for _ in 0..1000 {
            f.push(&[b'a'; 1000], &mut out);
        }
        assert_eq!(out, [Frame::TooLong]);
        assert!(f.buf.capacity() < 1024);
        f.push(b"aaa\n{}\n", &mut out);
        assert_eq!(out, [Frame::TooLong, msg("{}")]);
        assert_eq!(frames(4, &[b"xxxxxxxx\n{}"]), [Frame::TooLong, msg("{}")]);
    }
}
