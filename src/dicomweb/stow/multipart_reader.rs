//! A streaming reader of `multipart/related` request bodies (RFC 2046 5.1, RFC 2387), for STOW-RS.
//!
//! The body arrives as a stream of chunks; the reader yields each part's headers, then its content
//! as a sequence of chunks, without ever holding more than one incoming chunk plus a boundary's
//! length of bytes (and, while a part's headers are read, at most [`MAX_HEADERS`] bytes). A part's
//! end is only reported once the delimiter that closes it has been seen: a body that breaks off
//! inside a part is an error ([`MultipartError::Truncated`]), never a short part.
//!
//! The preamble (before the first delimiter) and the epilogue (after the close delimiter) are
//! ignored, as RFC 2046 asks.

use bytes::{Buf, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use memchr::memmem::Finder;

/// Largest header section of one part, in bytes.
pub const MAX_HEADERS: usize = 16 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MultipartError {
    /// The body could not be read (the client went away, or the connection broke).
    #[error("reading the request body failed: {0}")]
    Body(String),
    #[error("the request body is larger than the {0} byte limit")]
    TooLarge(u64),
    #[error("no multipart boundary delimiter (--{0}) in the request body")]
    NoBoundary(String),
    #[error("the multipart body ends before its closing boundary delimiter (--{0}--)")]
    Truncated(String),
    #[error("the header section of a part is larger than {MAX_HEADERS} bytes")]
    HeadersTooLarge,
    #[error("malformed multipart body: {0}")]
    Malformed(String),
}

/// The header fields of one part, names in lower case, in their order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartHeaders(pub Vec<(String, String)>);

impl PartHeaders {
    pub fn get(&self, name: &str) -> Option<&str> {
        (self.0.iter())
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the first delimiter.
    Preamble,
    /// Just after a delimiter: a close delimiter (`--`) or the line end that starts a part.
    AfterDelimiter,
    /// In a part's content.
    Content,
    /// After the close delimiter.
    Done,
}

pub struct MultipartReader<S> {
    body: S,
    /// Unconsumed bytes: the tail of the last chunk that could still start a delimiter, plus the
    /// chunk being looked at.
    buf: BytesMut,
    /// `CRLF--boundary`: the delimiter that precedes every part and the close delimiter.
    delimiter: Finder<'static>,
    boundary: String,
    state: State,
    received: u64,
    limit: u64,
}

impl<S, E> MultipartReader<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    /// A reader of `body`, whose parts are separated by `boundary` (the Content-Type parameter);
    /// bodies larger than `limit` bytes are refused ([`MultipartError::TooLarge`]).
    pub fn new(body: S, boundary: &str, limit: u64) -> Self {
        let delimiter = format!("\r\n--{boundary}").into_bytes();
        // The first delimiter may open the body without a line break before it: reading the body
        // as if it started with one makes every delimiter the same.
        let mut buf = BytesMut::with_capacity(64 * 1024);
        buf.extend_from_slice(b"\r\n");
        MultipartReader {
            body,
            buf,
            delimiter: Finder::new(&delimiter).into_owned(),
            boundary: boundary.to_string(),
            state: State::Preamble,
            received: 0,
            limit,
        }
    }

    fn delimiter_len(&self) -> usize {
        self.delimiter.needle().len()
    }

    /// Appends the next chunk of the body to the buffer; false at its end.
    async fn fill(&mut self) -> Result<bool, MultipartError> {
        loop {
            match self.body.next().await {
                None => return Ok(false),
                Some(Err(e)) => return Err(MultipartError::Body(e.to_string())),
                Some(Ok(chunk)) if chunk.is_empty() => continue,
                Some(Ok(chunk)) => {
                    self.received += chunk.len() as u64;
                    if self.received > self.limit {
                        return Err(MultipartError::TooLarge(self.limit));
                    }
                    self.buf.extend_from_slice(&chunk);
                    return Ok(true);
                }
            }
        }
    }

    /// The headers of the next part, or None after the last one. The rest of the current part's
    /// content, if any, is skipped.
    pub async fn next_part(&mut self) -> Result<Option<PartHeaders>, MultipartError> {
        loop {
            match self.state {
                State::Done => return Ok(None),
                State::Content => while self.next_chunk().await?.is_some() {},
                State::Preamble => self.skip_preamble().await?,
                State::AfterDelimiter => {
                    return match self.after_delimiter().await? {
                        true => {
                            self.state = State::Content;
                            Ok(Some(self.read_headers().await?))
                        }
                        false => {
                            self.state = State::Done;
                            Ok(None)
                        }
                    }
                }
            }
        }
    }

    /// The next chunk of the current part's content; None at its end (its closing delimiter seen).
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, MultipartError> {
        if self.state != State::Content {
            return Ok(None);
        }
        loop {
            if let Some(at) = self.delimiter.find(&self.buf) {
                if at > 0 {
                    return Ok(Some(self.buf.split_to(at).freeze()));
                }
                self.buf.advance(self.delimiter_len());
                self.state = State::AfterDelimiter;
                return Ok(None);
            }
            // Everything but a tail that could be the start of a delimiter is content.
            let safe = self.buf.len().saturating_sub(self.delimiter_len() - 1);
            if safe > 0 {
                return Ok(Some(self.buf.split_to(safe).freeze()));
            }
            if !self.fill().await? {
                return Err(MultipartError::Truncated(self.boundary.clone()));
            }
        }
    }

    async fn skip_preamble(&mut self) -> Result<(), MultipartError> {
        loop {
            if let Some(at) = self.delimiter.find(&self.buf) {
                self.buf.advance(at + self.delimiter_len());
                self.state = State::AfterDelimiter;
                return Ok(());
            }
            let keep = self.delimiter_len() - 1;
            if self.buf.len() > keep {
                self.buf.advance(self.buf.len() - keep);
            }
            if !self.fill().await? {
                return Err(MultipartError::NoBoundary(self.boundary.clone()));
            }
        }
    }

    /// After a delimiter: true when a part follows (the buffer then starts with the CRLF that
    /// ends the delimiter line), false for the close delimiter.
    async fn after_delimiter(&mut self) -> Result<bool, MultipartError> {
        loop {
            // Transport padding (RFC 2046: linear white space) may follow a delimiter.
            let padding = self
                .buf
                .iter()
                .take_while(|b| **b == b' ' || **b == b'\t')
                .count();
            let rest = &self.buf[padding..];
            if padding == 0 && rest.starts_with(b"--") {
                return Ok(false);
            }
            if rest.starts_with(b"\r\n") {
                self.buf.advance(padding);
                return Ok(true);
            }
            let undecided = rest.is_empty() || (padding == 0 && rest == b"-") || rest == b"\r";
            if !undecided {
                return Err(MultipartError::Malformed(
                    "a boundary delimiter is followed by neither a line break nor \"--\"".into(),
                ));
            }
            if self.buf.len() > MAX_HEADERS {
                return Err(MultipartError::HeadersTooLarge);
            }
            if !self.fill().await? {
                return Err(MultipartError::Truncated(self.boundary.clone()));
            }
        }
    }

    /// Reads a part's header section; the buffer starts with the CRLF of the delimiter line.
    async fn read_headers(&mut self) -> Result<PartHeaders, MultipartError> {
        let end = Finder::new(b"\r\n\r\n");
        loop {
            if let Some(at) = end.find(&self.buf) {
                if at > MAX_HEADERS {
                    return Err(MultipartError::HeadersTooLarge);
                }
                let section = if at >= 2 { &self.buf[2..at] } else { &[][..] };
                let headers = parse_headers(section)?;
                self.buf.advance(at + 4);
                return Ok(headers);
            }
            if self.buf.len() > MAX_HEADERS {
                return Err(MultipartError::HeadersTooLarge);
            }
            if !self.fill().await? {
                return Err(MultipartError::Truncated(self.boundary.clone()));
            }
        }
    }
}

/// Parses header fields (`Name: value` lines, continuation lines folded into the previous one).
fn parse_headers(section: &[u8]) -> Result<PartHeaders, MultipartError> {
    let text = std::str::from_utf8(section)
        .map_err(|_| MultipartError::Malformed("a part header is not UTF-8 text".into()))?;
    let mut fields: Vec<(String, String)> = Vec::new();
    for line in text.split("\r\n").filter(|l| !l.is_empty()) {
        if line.starts_with([' ', '\t']) {
            match fields.last_mut() {
                Some((_, value)) => {
                    value.push(' ');
                    value.push_str(line.trim());
                }
                None => {
                    return Err(MultipartError::Malformed(
                        "a part's header section starts with a continuation line".into(),
                    ))
                }
            }
            continue;
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(MultipartError::Malformed(format!(
                "part header line {line:?} has no colon"
            )));
        };
        fields.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    Ok(PartHeaders(fields))
}

/// The parameters of a `multipart/related` Content-Type that STOW-RS needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelatedType {
    pub boundary: String,
    /// The `type` parameter, lower case, if present.
    pub root_type: Option<String>,
}

/// Why a request's Content-Type cannot be read as `multipart/related`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContentTypeError {
    /// Another media type than `multipart/related`.
    NotRelated(String),
    /// `multipart/related` without a usable boundary.
    NoBoundary,
}

/// Reads `multipart/related; type="application/dicom"; boundary=...` (parameter values quoted or
/// not, names in any case, in any order).
pub fn parse_related(content_type: &str) -> Result<RelatedType, ContentTypeError> {
    let mut params = split_params(content_type).into_iter();
    let media = params
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    if media != "multipart/related" {
        return Err(ContentTypeError::NotRelated(media));
    }
    let (mut boundary, mut root_type) = (None, None);
    for param in params {
        let Some((name, value)) = param.split_once('=') else {
            continue;
        };
        let value = unquote(value.trim());
        match name.trim().to_ascii_lowercase().as_str() {
            "boundary" => boundary = Some(value),
            "type" => root_type = Some(value.to_ascii_lowercase()),
            _ => {}
        }
    }
    // RFC 2046: 1 to 70 characters.
    match boundary {
        Some(boundary) if !boundary.is_empty() && boundary.len() <= 70 => Ok(RelatedType {
            boundary,
            root_type,
        }),
        _ => Err(ContentTypeError::NoBoundary),
    }
}

/// Splits on `;` outside quoted strings.
fn split_params(s: &str) -> Vec<String> {
    let (mut out, mut current, mut quoted, mut escaped) = (Vec::new(), String::new(), false, false);
    for c in s.chars() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ';' if !quoted => {
                out.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    out.push(current);
    out
}

/// A parameter value without its quotes and quoted-pair escapes.
fn unquote(value: &str) -> String {
    match value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        Some(inner) => {
            let (mut out, mut escaped) = (String::new(), false);
            for c in inner.chars() {
                if c == '\\' && !escaped {
                    escaped = true;
                    continue;
                }
                escaped = false;
                out.push(c);
            }
            out
        }
        None => value.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Chunks = futures::stream::Iter<std::vec::IntoIter<Result<Bytes, std::io::Error>>>;

    fn stream(chunks: Vec<Vec<u8>>) -> Chunks {
        futures::stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok(Bytes::from(c)))
                .collect::<Vec<_>>(),
        )
    }

    /// Reads every part: (headers, content).
    async fn read_all(
        chunks: Vec<Vec<u8>>,
        boundary: &str,
    ) -> Result<Vec<(PartHeaders, Vec<u8>)>, MultipartError> {
        let mut reader = MultipartReader::new(stream(chunks), boundary, u64::MAX);
        let mut parts = Vec::new();
        while let Some(headers) = reader.next_part().await? {
            let mut content = Vec::new();
            while let Some(chunk) = reader.next_chunk().await? {
                content.extend_from_slice(&chunk);
            }
            parts.push((headers, content));
        }
        Ok(parts)
    }

    fn run<T>(f: impl std::future::Future<Output = T>) -> T {
        futures::executor::block_on(f)
    }

    /// Content that almost holds the delimiter (a prefix of it, a line break, dashes).
    fn tricky_content(n: u8) -> Vec<u8> {
        let mut c = vec![n; 40];
        c.extend_from_slice(b"\r\n--bound\r\n-\r\n--boundar");
        c.extend_from_slice(&[0, 13, 10, 45, 45, n]);
        c
    }

    fn body(preamble: &[u8], epilogue: &[u8]) -> Vec<u8> {
        let mut b = preamble.to_vec();
        for n in 0..3u8 {
            if !(b.is_empty() && n == 0) {
                b.extend_from_slice(b"\r\n");
            }
            b.extend_from_slice(b"--boundary\r\nContent-Type: application/dicom\r\n");
            b.extend_from_slice(format!("Content-ID: <{n}>\r\n\r\n").as_bytes());
            b.extend_from_slice(&tricky_content(n));
        }
        b.extend_from_slice(b"\r\n--boundary--");
        b.extend_from_slice(epilogue);
        b
    }

    fn check_parts(parts: &[(PartHeaders, Vec<u8>)]) {
        assert_eq!(parts.len(), 3);
        for (n, (headers, content)) in parts.iter().enumerate() {
            assert_eq!(headers.get("content-type"), Some("application/dicom"));
            assert_eq!(headers.get("Content-ID"), Some(format!("<{n}>").as_str()));
            assert_eq!(content, &tricky_content(n as u8));
        }
    }

    #[test]
    fn parts_are_found_whatever_the_chunk_boundaries() {
        let whole = body(b"", b"");
        for at in 0..=whole.len() {
            let chunks = vec![whole[..at].to_vec(), whole[at..].to_vec()];
            check_parts(&run(read_all(chunks, "boundary")).unwrap());
        }
        for at in 0..whole.len() - 2 {
            let chunks = vec![
                whole[..at].to_vec(),
                whole[at..at + 2].to_vec(),
                whole[at + 2..].to_vec(),
            ];
            check_parts(&run(read_all(chunks, "boundary")).unwrap());
        }
        let bytes = whole.iter().map(|b| vec![*b]).collect();
        check_parts(&run(read_all(bytes, "boundary")).unwrap());
    }

    #[test]
    fn preamble_and_epilogue_are_ignored() {
        let whole = body(
            b"This is a preamble.\r\n-boundary is not the delimiter\r\n",
            b"\r\nand an epilogue --boundary\r\n",
        );
        for at in 0..=whole.len() {
            let chunks = vec![whole[..at].to_vec(), whole[at..].to_vec()];
            check_parts(&run(read_all(chunks, "boundary")).unwrap());
        }
    }

    #[test]
    fn a_part_without_headers_and_transport_padding_are_read() {
        let whole = b"--b \t\r\n\r\nabc\r\n--b\r\nX-A: 1\r\n  continued\r\n\r\n\r\n--b--".to_vec();
        let parts = run(read_all(vec![whole], "b")).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].0, PartHeaders::default());
        assert_eq!(parts[0].1, b"abc");
        assert_eq!(parts[1].0.get("x-a"), Some("1 continued"));
        assert_eq!(parts[1].1, b"");
    }

    #[test]
    fn a_missing_close_delimiter_is_an_error_wherever_the_body_stops() {
        let whole = body(b"", b"");
        let close = whole.len() - b"--".len();
        for at in 0..close {
            let result = run(read_all(vec![whole[..at].to_vec()], "boundary"));
            assert!(
                matches!(
                    result,
                    Err(MultipartError::Truncated(_) | MultipartError::NoBoundary(_))
                ),
                "cut at {at}: {result:?}"
            );
        }
        assert!(run(read_all(vec![whole[..close].to_vec()], "boundary")).is_err());
    }

    #[test]
    fn a_body_without_delimiter_is_refused() {
        let result = run(read_all(vec![b"just some bytes".to_vec()], "boundary"));
        assert_eq!(result, Err(MultipartError::NoBoundary("boundary".into())));
    }

    #[test]
    fn header_sections_are_capped() {
        let mut whole = b"--b\r\nX-Big: ".to_vec();
        whole.extend(std::iter::repeat_n(b'a', MAX_HEADERS + 10));
        whole.extend_from_slice(b"\r\n\r\ncontent\r\n--b--");
        let chunks = whole.chunks(1000).map(|c| c.to_vec()).collect();
        let result = run(read_all(chunks, "b"));
        assert_eq!(result, Err(MultipartError::HeadersTooLarge));
    }

    #[test]
    fn malformed_headers_and_delimiters_are_refused() {
        let no_colon = b"--b\r\nnot a header\r\n\r\nx\r\n--b--".to_vec();
        assert!(matches!(
            run(read_all(vec![no_colon], "b")),
            Err(MultipartError::Malformed(_))
        ));
        let junk_after = b"--b\r\n\r\nx\r\n--bjunk\r\n\r\n--b--".to_vec();
        assert!(matches!(
            run(read_all(vec![junk_after], "b")),
            Err(MultipartError::Malformed(_))
        ));
    }

    #[test]
    fn bodies_over_the_limit_are_refused() {
        let whole = body(b"", b"");
        let mut reader = MultipartReader::new(stream(vec![whole.clone()]), "boundary", 10);
        assert_eq!(run(reader.next_part()), Err(MultipartError::TooLarge(10)));
        let mut reader = MultipartReader::new(stream(vec![whole.clone()]), "boundary", 1 << 20);
        assert!(run(reader.next_part()).unwrap().is_some());
    }

    #[test]
    fn skipping_a_part_moves_to_the_next() {
        let whole = body(b"", b"");
        let mut reader = MultipartReader::new(stream(vec![whole]), "boundary", u64::MAX);
        let mut ids = Vec::new();
        while let Some(h) = run(reader.next_part()).unwrap() {
            ids.push(h.get("content-id").unwrap().to_string());
        }
        assert_eq!(ids, ["<0>", "<1>", "<2>"]);
    }

    #[test]
    fn related_content_types_are_read_quoted_or_not() {
        let ok = |s: &str, boundary: &str, root: Option<&str>| {
            assert_eq!(
                parse_related(s),
                Ok(RelatedType {
                    boundary: boundary.into(),
                    root_type: root.map(String::from)
                }),
                "{s}"
            )
        };
        ok(
            "multipart/related; type=\"application/dicom\"; boundary=\"a b;c\"",
            "a b;c",
            Some("application/dicom"),
        );
        ok(
            "Multipart/Related;boundary=xyz;TYPE=application/DICOM",
            "xyz",
            Some("application/dicom"),
        );
        ok("multipart/related; boundary=\"q\\\"x\"", "q\"x", None);
        assert_eq!(
            parse_related("application/dicom"),
            Err(ContentTypeError::NotRelated("application/dicom".into()))
        );
        assert_eq!(
            parse_related("multipart/related; type=application/dicom"),
            Err(ContentTypeError::NoBoundary)
        );
        assert_eq!(
            parse_related("multipart/related; boundary=\"\""),
            Err(ContentTypeError::NoBoundary)
        );
    }
}
