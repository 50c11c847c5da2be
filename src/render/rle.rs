//! RLE Lossless decoding (PS3.5 Annex G), written here because dicom-rs's RLE decoder stops at 16
//! bits allocated: a frame is a 64-byte header (segment count, then up to 15 segment offsets) and
//! one PackBits segment per byte plane, most significant byte of each sample first, sample after
//! sample. The output is pixel-interleaved little-endian samples, as the native path expects.

use super::RenderError;

/// Decodes one RLE frame of `pixels` pixels with `samples` samples of `bytes_per_sample` bytes.
pub fn decode(
    frame: &[u8],
    pixels: usize,
    samples: usize,
    bytes_per_sample: usize,
) -> Result<Vec<u8>, RenderError> {
    let bad = |m: &str| RenderError::Invalid(format!("RLE frame: {m}"));
    let word = |i: usize| -> Option<usize> {
        let b = frame.get(i * 4..i * 4 + 4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let count = word(0).ok_or_else(|| bad("no header"))?;
    let planes = samples * bytes_per_sample;
    if count != planes || count > 15 {
        return Err(bad(&format!("{count} segments for {planes} byte planes")));
    }
    let stride = samples * bytes_per_sample;
    let mut out = vec![0u8; pixels * stride];
    for segment in 0..count {
        let start = word(segment + 1).ok_or_else(|| bad("short header"))?;
        let end = if segment + 1 < count {
            word(segment + 2).ok_or_else(|| bad("short header"))?
        } else {
            frame.len()
        };
        let data = frame
            .get(start..end.max(start))
            .ok_or_else(|| bad("segment outside the frame"))?;
        let plane = unpack_bits(data, pixels);
        if plane.len() < pixels {
            return Err(bad("segment shorter than the frame"));
        }
        // Segment s holds byte (bytes-1 - s % bytes) of sample s / bytes (most significant first).
        let sample = segment / bytes_per_sample;
        let byte = bytes_per_sample - 1 - segment % bytes_per_sample;
        let offset = sample * bytes_per_sample + byte;
        for (p, &v) in plane.iter().take(pixels).enumerate() {
            out[p * stride + offset] = v;
        }
    }
    Ok(out)
}

/// PackBits: a header byte n; 0..=127 copies the next n+1 bytes, -127..=-1 repeats the next byte
/// 1-n times, -128 is skipped. Stops after `limit` bytes of output.
fn unpack_bits(data: &[u8], limit: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(limit);
    let mut i = 0;
    while i < data.len() && out.len() < limit {
        let n = data[i] as i8;
        i += 1;
        if n >= 0 {
            let len = n as usize + 1;
            let end = (i + len).min(data.len());
            out.extend_from_slice(&data[i..end]);
            i = end;
        } else if n != -128 {
            if let Some(&v) = data.get(i) {
                out.extend(std::iter::repeat_n(v, (1 - isize::from(n)) as usize));
            }
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packbits_literals_and_runs() {
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
