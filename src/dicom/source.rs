//! The reader every walk goes through: a buffered, forward-mostly cursor over an object (a file, a
//! byte slice, or an inflated stream that only seeks forward) that knows the object's size, so that
//! no declared length is trusted before it is checked against the bytes really there.

use std::io::{self, Read, Seek, SeekFrom};

use super::validate::eof;

/// Size of the internal read buffer.
const BUF_SIZE: usize = 8192;

/// How much to read after jumping past a value that did not fit in the buffer.
const READ_AFTER_JUMP: usize = 512;

pub(crate) struct Cursor<'r, R> {
    inner: &'r mut R,
    buf: [u8; BUF_SIZE],
    /// File offset of `buf[0]`.
    buf_off: u64,
    /// Number of valid bytes in `buf`.
    filled: usize,
    /// Position of `inner`, if known.
    inner_pos: Option<u64>,
    /// Logical position: file offset of the next byte to read.
    pub(crate) pos: u64,
    pub(crate) file_len: u64,
    /// Set for a walk that clears an object for dicom-rs (see [`super::validate::refuse_un_items`]).
    pub(crate) before_parse: bool,
}

impl<'r, R: Read + Seek> Cursor<'r, R> {
    pub(crate) fn new(inner: &'r mut R) -> io::Result<Self> {
        let file_len = inner.seek(SeekFrom::End(0))?;
        Ok(Cursor {
            inner,
            buf: [0; BUF_SIZE],
            buf_off: 0,
            filled: 0,
            inner_pos: Some(file_len),
            pos: 0,
            file_len,
            before_parse: false,
        })
    }

    /// Over a stream of `len` bytes read from its start (the walk seeks it forward only).
    pub(crate) fn over_stream(inner: &'r mut R, len: u64) -> Self {
        Cursor {
            inner,
            buf: [0; BUF_SIZE],
            buf_off: 0,
            filled: 0,
            inner_pos: Some(0),
            pos: 0,
            file_len: len,
            before_parse: false,
        }
    }

    pub(crate) fn remaining(&self) -> u64 {
        self.file_len.saturating_sub(self.pos)
    }

    pub(crate) fn seek_to(&mut self, pos: u64) {
        self.pos = pos;
    }

    pub(crate) fn check_available(&self, n: u64) -> io::Result<()> {
        if n > self.remaining() {
            Err(eof("value extends past the end of the file"))
        } else {
            Ok(())
        }
    }

    pub(crate) fn skip(&mut self, n: u64) -> io::Result<()> {
        self.check_available(n)?;
        self.pos += n;
        Ok(())
    }

    /// Make at least `need` (<= BUF_SIZE) bytes starting at `pos` available in the buffer;
    /// returns the index of `pos` in the buffer.
    fn fill(&mut self, need: usize) -> io::Result<usize> {
        let buf_end = self.buf_off + self.filled as u64;
        if self.pos >= self.buf_off && self.pos.saturating_add(need as u64) <= buf_end {
            return Ok((self.pos - self.buf_off) as usize);
        }
        let sequential = self.inner_pos == Some(buf_end);
        // how far to fill the buffer: all of it when reading on sequentially, a little after a
        // jump (which is typically past a large value, to read the next header only)
        let mut limit = BUF_SIZE;
        if sequential && self.pos >= self.buf_off && self.pos <= buf_end {
            // keep the tail and continue reading where the inner reader is
            let rel = (self.pos - self.buf_off) as usize;
            self.buf.copy_within(rel..self.filled, 0);
            self.filled -= rel;
            self.buf_off = self.pos;
        } else if sequential
            && self.pos > buf_end
            && self.pos - buf_end + need as u64 <= BUF_SIZE as u64
        {
            // short hop forward: read through it rather than seek
            self.buf_off = buf_end;
            self.filled = 0;
        } else {
            self.reset_at_pos()?;
            limit = need.clamp(READ_AFTER_JUMP, BUF_SIZE);
        }
        let rel = (self.pos - self.buf_off) as usize;
        while self.filled < rel + need {
            match self.inner.read(&mut self.buf[self.filled..limit]) {
                Ok(0) => break,
                Ok(n) => {
                    self.filled += n;
                    self.inner_pos = self.inner_pos.map(|p| p + n as u64);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.inner_pos = None;
                    return Err(e);
                }
            }
        }
        if self.filled < rel + need {
            return Err(eof("unexpected end of file"));
        }
        Ok(rel)
    }

    fn reset_at_pos(&mut self) -> io::Result<()> {
        self.filled = 0;
        self.buf_off = self.pos;
        if self.inner_pos != Some(self.pos) {
            self.inner_pos = None;
            self.inner.seek(SeekFrom::Start(self.pos))?;
            self.inner_pos = Some(self.pos);
        }
        Ok(())
    }

    pub(crate) fn read_into(&mut self, out: &mut [u8]) -> io::Result<()> {
        for chunk in out.chunks_mut(BUF_SIZE) {
            let rel = self.fill(chunk.len())?;
            chunk.copy_from_slice(&self.buf[rel..rel + chunk.len()]);
            self.pos += chunk.len() as u64;
        }
        Ok(())
    }

    /// Reads `n` bytes into a new vector, allocated only once the object is known to hold them.
    pub(crate) fn read_vec(&mut self, n: u64) -> io::Result<Vec<u8>> {
        self.check_available(n)?;
        let mut out = vec![0u8; n as usize];
        self.read_into(&mut out)?;
        Ok(out)
    }

    pub(crate) fn read_array<const N: usize>(&mut self) -> io::Result<[u8; N]> {
        let mut out = [0u8; N];
        self.read_into(&mut out)?;
        Ok(out)
    }
}
