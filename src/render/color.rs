//! Colour conversions of decoded pixel data to 8-bit RGB: YCbCr full range (PS3.3 C.7.6.3.1.2,
//! the ITU-R BT.601 equations with the chroma centred on 128), the expansion of YBR_FULL_422's
//! horizontally subsampled chroma, and planar (R..., G..., B...) to interleaved samples.

/// Converts one YBR_FULL pixel to RGB.
pub fn ybr_full_to_rgb(y: f64, cb: f64, cr: f64) -> [u8; 3] {
    let (cb, cr) = (cb - 128.0, cr - 128.0);
    let r = y + 1.402 * cr;
    let g = y - 0.344_136 * cb - 0.714_136 * cr;
    let b = y + 1.772 * cb;
    [clamp8(r), clamp8(g), clamp8(b)]
}

fn clamp8(v: f64) -> u8 {
    v.round().clamp(0.0, 255.0) as u8
}

/// Expands native YBR_FULL_422 samples (`Y1 Y2 Cb Cr` for each pair of pixels on a row, PS3.3
/// C.7.6.3.1.2) to one `Y Cb Cr` triple per pixel. An odd last column shares its pair's chroma.
pub fn expand_422(samples: &[i32], rows: usize, columns: usize) -> Option<Vec<i32>> {
    let pairs = columns.div_ceil(2);
    if samples.len() < rows * pairs * 4 {
        return None;
    }
    let mut out = Vec::with_capacity(rows * columns * 3);
    for row in 0..rows {
        for pair in 0..pairs {
            let s = &samples[(row * pairs + pair) * 4..][..4];
            let (cb, cr) = (s[2], s[3]);
            out.extend_from_slice(&[s[0], cb, cr]);
            if pair * 2 + 1 < columns {
                out.extend_from_slice(&[s[1], cb, cr]);
            }
        }
    }
    Some(out)
}

/// Reorders planar samples (all of plane 0, then plane 1, ...) into interleaved pixels.
pub fn interleave(samples: &[i32], planes: usize) -> Vec<i32> {
    let n = samples.len() / planes;
    let mut out = Vec::with_capacity(n * planes);
    for i in 0..n {
        for p in 0..planes {
            out.push(samples[p * n + i]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ybr_full_matches_the_standard_equations() {
        // Grey: no chroma.
        assert_eq!(ybr_full_to_rgb(100.0, 128.0, 128.0), [100, 100, 100]);
        // Y=76.245, Cb=84.972, Cr=255.5 is pure red in BT.601 full range.
        assert_eq!(ybr_full_to_rgb(76.245, 84.972, 255.5), [255, 0, 0]);
        // Y=81, Cb=90, Cr=240: R = 81 + 1.402*112 = 238.02; G = 81 + 0.344136*38 - 0.714136*112 =
        // 14.09; B = 81 - 1.772*38 = 13.66.
        assert_eq!(ybr_full_to_rgb(81.0, 90.0, 240.0), [238, 14, 14]);
        // Out-of-gamut values clamp.
        assert_eq!(ybr_full_to_rgb(250.0, 255.0, 255.0)[0], 255);
    }

    #[test]
    fn subsampled_chroma_is_shared_by_each_pair() {
        // One row of 3 pixels: pairs (Y1 Y2 Cb Cr) (Y3 _ Cb Cr).
        let s = [10, 20, 1, 2, 30, 0, 3, 4];
        assert_eq!(
            expand_422(&s, 1, 3).unwrap(),
            vec![10, 1, 2, 20, 1, 2, 30, 3, 4]
        );
        assert!(expand_422(&s[..7], 1, 3).is_none());
    }

    #[test]
    fn planes_are_interleaved() {
        assert_eq!(
            interleave(&[1, 2, 10, 20, 100, 200], 3),
            vec![1, 10, 100, 2, 20, 200]
        );
    }
}
