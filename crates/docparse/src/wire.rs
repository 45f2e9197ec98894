//! The pipe protocol between the worker and its parser child: one frame per message, a
//! little-endian `u32` header length, the header as JSON, then `body_len` raw bytes. Raw bytes,
//! because documents and texts are megabytes that JSON escaping would inflate.

use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Largest header accepted (headers are a few hundred bytes; anything larger is a broken peer).
pub const MAX_HEADER: u32 = 64 * 1024;

/// What a document's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Plain text (UTF-8; invalid bytes become U+FFFD).
    Text,
    /// Markdown.
    Markdown,
    /// HTML.
    Html,
    /// PDF.
    Pdf,
    /// A fetched body: a PDF if it starts with `%PDF`, HTML if the server said so, else text.
    Fetched {
        /// The response's `Content-Type` mentioned HTML.
        html: bool,
    },
}

/// How the bytes are compressed (a fetched body's `Content-Encoding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    /// As they are.
    #[default]
    Identity,
    /// gzip.
    Gzip,
    /// zlib (HTTP's `deflate`).
    Deflate,
}

/// The limits one document is parsed under (memory and CPU time are the process's own).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Most characters of text the document may yield.
    pub max_text_chars: usize,
    /// Most pages a PDF may have.
    pub max_pages: usize,
    /// Most bytes a compressed body may inflate to.
    pub max_decoded_bytes: usize,
}

/// One document to parse; its bytes follow as the frame's body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    /// What the bytes are.
    pub kind: Kind,
    /// How they are compressed.
    #[serde(default)]
    pub encoding: Encoding,
    /// The limits.
    pub limits: Limits,
}

/// The answer to one request; when `Parsed`, the text follows as the frame's body (UTF-8).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// The document's text (normalised, never empty), and its pages.
    Parsed {
        /// Pages (PDF), or 1.
        pages: usize,
    },
    /// Why the document could not be read, for the job's `InvalidInput` error.
    Failed {
        /// The message.
        message: String,
    },
}

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    body_len: u64,
    #[serde(flatten)]
    header: T,
}

/// The bytes of one frame: `header`, then `body`.
pub fn encode<T: Serialize>(header: &T, body: &[u8]) -> Vec<u8> {
    let envelope = Envelope {
        body_len: body.len() as u64,
        header,
    };
    let json = serde_json::to_vec(&envelope).expect("headers are plain data");
    let mut frame = Vec::with_capacity(4 + json.len() + body.len());
    frame.extend_from_slice(&(json.len() as u32).to_le_bytes());
    frame.extend_from_slice(&json);
    frame.extend_from_slice(body);
    frame
}

/// Writes one frame and flushes it.
pub fn write<T: Serialize>(out: &mut impl Write, header: &T, body: &[u8]) -> io::Result<()> {
    out.write_all(&encode(header, body))?;
    out.flush()
}

/// A frame's header, parsed, and the length of the body that follows it.
pub fn decode_header<T: DeserializeOwned>(json: &[u8]) -> io::Result<(T, u64)> {
    let envelope: Envelope<T> =
        serde_json::from_slice(json).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok((envelope.header, envelope.body_len))
}

/// Reads one frame whose body may be at most `max_body` bytes; `None` at a clean end of input.
pub fn read<T: DeserializeOwned>(
    input: &mut impl Read,
    max_body: u64,
) -> io::Result<Option<(T, Vec<u8>)>> {
    let mut len = [0u8; 4];
    match input.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len);
    if len > MAX_HEADER {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a {len}-byte frame header"),
        ));
    }
    let mut json = vec![0u8; len as usize];
    input.read_exact(&mut json)?;
    let (header, body_len) = decode_header(&json)?;
    if body_len > max_body {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a {body_len}-byte frame body, over {max_body}"),
        ));
    }
    let mut body = Vec::new();
    input.take(body_len).read_to_end(&mut body)?;
    if body.len() as u64 != body_len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(Some((header, body)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_reads_back_as_written_and_a_clean_end_is_none() {
        let request = Request {
            kind: Kind::Fetched { html: true },
            encoding: Encoding::Gzip,
            limits: Limits {
                max_text_chars: 10,
                max_pages: 2,
                max_decoded_bytes: 3,
            },
        };
        let mut bytes = encode(&request, b"body");
        bytes.extend(encode(
            &Reply::Failed {
                message: "x".into(),
            },
            b"",
        ));
        let mut input = bytes.as_slice();
        let (read_back, body) = read::<Request>(&mut input, 100).unwrap().unwrap();
        assert_eq!(
            (read_back.kind, read_back.encoding, body.as_slice()),
            (request.kind, request.encoding, b"body".as_slice())
        );
        let (reply, _) = read::<Reply>(&mut input, 100).unwrap().unwrap();
        assert_eq!(
            reply,
            Reply::Failed {
                message: "x".into()
            }
        );
        assert!(read::<Reply>(&mut input, 100).unwrap().is_none());
    }

    #[test]
    fn oversized_bodies_and_cut_frames_are_errors() {
        let bytes = encode(&Reply::Parsed { pages: 1 }, &[b'a'; 50]);
        assert!(read::<Reply>(&mut bytes.as_slice(), 10).is_err());
        assert!(read::<Reply>(&mut &bytes[..bytes.len() - 1], 100).is_err());
    }
}
