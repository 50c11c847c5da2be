//! RLE Lossless decoding (PS3.5 Annex G), the one decoder that transcoding and rendering use,
//! written here because the registry's decoder handles 8 and 16 bits allocated only, and RT dose
//! and other 32-bit images are stored in RLE too.
//!
//! A frame is one fragment: a 64-byte header (the number of segments, then up to 15 segment
//! offsets), then the segments, each PackBits-coded. Segments come one per byte of each sample,
//! most significant byte first, component after component; the output is little endian, colour by
//! pixel.

/// A frame that is not valid RLE Lossless.
#[derive(Debug, thiserror::Error)]
#[error("invalid RLE frame: {0}")]
pub struct InvalidRle(String);

/// Decodes one RLE frame of `pixels` pixels with `samples` samples of `sample_bytes` bytes each into
/// native little endian samples, colour by pixel.
pub fn decode(
    frame: &[u8],
    pixels: usize,
    samples: usize,
    sample_bytes: usize,
) -> Result<Vec<u8>, InvalidRle> {
    let bad = |why: &str| InvalidRle(why.to_string());
    let components = samples;
    let word = |i: usize| -> Option<usize> {
        let b = frame.get(i * 4..i * 4 + 4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let segments = word(0).ok_or_else(|| bad("no header"))?;
    if segments != sample_bytes * components || segments > 15 {
        return Err(bad(&format!(
            "{segments} segments for {components} samples of {sample_bytes} bytes"
        )));
    }
    let mut out = vec![0u8; pixels * components * sample_bytes];
    for segment in 0..segments {
        let start = word(1 + segment).ok_or_else(|| bad("short header"))?;
        let end = match segment + 1 < segments {
            true => word(2 + segment).ok_or_else(|| bad("short header"))?,
            false => frame.len(),
        };
        let coded = frame
            .get(start..end)
            .ok_or_else(|| bad("segment outside the fragment"))?;
        let decoded = unpack_bits(coded, pixels);
        if decoded.len() < pixels {
            return Err(bad(&format!(
                "segment {segment} holds {} of {pixels} bytes",
                decoded.len()
            )));
        }
        // Segment order: component, then byte from the most significant one.
        let component = segment / sample_bytes;
        let byte = sample_bytes - 1 - segment % sample_bytes;
        for (p, value) in decoded.iter().take(pixels).enumerate() {
            out[(p * components + component) * sample_bytes + byte] = *value;
        }
    }
    Ok(out)
}

/// PackBits (PS3.5 G.3.1): a header byte n, then n+1 literal bytes (0 <= n <= 127) or one byte
/// repeated 1-n times (-127 <= n <= -1); -128 is a no-op. Stops once `limit` bytes are out.
fn unpack_bits(coded: &[u8], limit: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(limit);
    let mut i = 0;
    while i < coded.len() && out.len() < limit {
        let n = coded[i] as i8;
        i += 1;
        match n {
            0..=127 => {
                let end = (i + n as usize + 1).min(coded.len());
                out.extend_from_slice(&coded[i..end]);
                i = end;
            }
            -127..=-1 => {
                if let Some(&b) = coded.get(i) {
                    out.extend(std::iter::repeat_n(b, (1 - n as isize) as usize));
                }
                i += 1;
            }
            -128 => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three pixels of `samples` samples of `bits` bits.
    fn decode_3(bits: usize, samples: usize, frame: &[u8]) -> Result<Vec<u8>, InvalidRle> {
        decode(frame, 3, samples, bits / 8)
    }

    fn frame(segments: &[&[u8]]) -> Vec<u8> {
        let mut head = vec![0u8; 64];
        head[0..4].copy_from_slice(&(segments.len() as u32).to_le_bytes());
        let mut offset = 64u32;
        let mut body = Vec::new();
        for (i, s) in segments.iter().enumerate() {
            head[4 + i * 4..8 + i * 4].copy_from_slice(&offset.to_le_bytes());
            offset += s.len() as u32;
            body.extend_from_slice(s);
        }
        head.extend(body);
        head
    }

    #[test]
    fn packbits_literals_runs_and_no_ops() {
        assert_eq!(unpack_bits(&[2, 1, 2, 3], 3), vec![1, 2, 3]);
        assert_eq!(unpack_bits(&[(-2i8) as u8, 7], 3), vec![7, 7, 7]);
        assert_eq!(
            unpack_bits(&[0x80, 0, 9, (-1i8) as u8, 4], 3),
            vec![9, 4, 4]
        );
    }

    #[test]
    fn thirty_two_bit_samples_come_out_little_endian() {
        // Three pixels 0x01020304, 0x0A0B0C0D, 0xFF000000: one segment per byte, MSB first.
        let f = frame(&[
            &[2, 0x01, 0x0A, 0xFF],
            &[2, 0x02, 0x0B, 0x00],
            &[2, 0x03, 0x0C, 0x00],
            &[2, 0x04, 0x0D, 0x00],
        ]);
        let out = decode_3(32, 1, &f).unwrap();
        let values: Vec<u32> = out
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(values, vec![0x01020304, 0x0A0B0C0D, 0xFF000000]);
    }

    #[test]
    fn colour_is_interleaved_and_short_segments_fail() {
        let f = frame(&[&[(-2i8) as u8, 1], &[(-2i8) as u8, 2], &[(-2i8) as u8, 3]]);
        assert_eq!(decode_3(8, 3, &f).unwrap(), vec![1, 2, 3, 1, 2, 3, 1, 2, 3]);
        let short = frame(&[&[0, 1], &[0, 2], &[0, 3]]);
        assert!(decode_3(8, 3, &short).is_err());
    }

    #[test]
    fn packbits_stops_at_the_limit() {
        // 2 literals (n=1), a run of 3 x 7 (n=-2), a no-op (-128), 1 literal.
        let data = [1, 10, 11, 0xFE, 7, 0x80, 0, 42];
        assert_eq!(unpack_bits(&data, 100), vec![10, 11, 7, 7, 7, 42]);
        assert_eq!(unpack_bits(&data, 3), vec![10, 11, 7, 7, 7]);
    }

    #[test]
    fn sixteen_bit_planes_are_most_significant_first() {
        // Two pixels, one 16-bit sample: values 0x0102 and 0x0304.
        let mut frame = vec![0u8; 64];
        frame[0] = 2; // two segments
        frame[4] = 64; // high bytes
        frame[8] = 67; // low bytes
        frame.extend_from_slice(&[1, 0x01, 0x03]); // literal high bytes
        frame.extend_from_slice(&[1, 0x02, 0x04]); // literal low bytes
        assert_eq!(
            decode(&frame, 2, 1, 2).unwrap(),
            vec![0x02, 0x01, 0x04, 0x03]
        );
        assert!(decode(&frame, 2, 1, 4).is_err());
    }
}
