//! Lookup tables (PS3.3 C.11.1 Modality LUT, C.11.2 VOI LUT, C.7.6.3.1.5 Palette Color LUT): the
//! descriptor (number of entries, first input value mapped, bits per entry) and the data, and the
//! lookup rule that clamps inputs outside the table to its first or last entry.

/// One LUT, its entries widened to `u16`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lut {
    /// The input value mapped to the first entry.
    pub first_mapped: i32,
    /// Bits per entry (8 or 16, sometimes 10 to 15): entries range over `0..2^bits`.
    pub bits: u16,
    pub entries: Vec<u16>,
}

impl Lut {
    /// Builds a LUT from its descriptor's three values and its data, given as 16-bit words (OW, or
    /// US) or as bytes (OB, or an 8-bit table packed into the bytes of its words).
    ///
    /// The descriptor's first value is the number of entries, 0 meaning 65536; the second the first
    /// input value mapped (US or SS: the caller passes it as read); the third the bits per entry.
    pub fn new(descriptor: [i32; 3], data: LutData<'_>) -> Result<Lut, String> {
        let count = match descriptor[0] {
            0 => 65536,
            n if n > 0 => n as usize,
            n => return Err(format!("LUT descriptor has {n} entries")),
        };
        let bits = descriptor[2];
        if !(1..=16).contains(&bits) {
            return Err(format!("LUT descriptor has {bits} bits per entry"));
        }
        let entries: Vec<u16> = match data {
            LutData::Words(words) if words.len() >= count => words[..count].to_vec(),
            // An 8-bit table may be packed two entries per word.
            LutData::Words(words) if bits <= 8 && words.len() * 2 >= count => words
                .iter()
                .flat_map(|w| w.to_le_bytes())
                .take(count)
                .map(u16::from)
                .collect(),
            LutData::Bytes(bytes) if bits <= 8 && bytes.len() >= count => {
                bytes[..count].iter().map(|&b| u16::from(b)).collect()
            }
            LutData::Bytes(bytes) if bytes.len() >= count * 2 => bytes
                .chunks_exact(2)
                .take(count)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect(),
            _ => return Err(format!("LUT data holds fewer than its {count} entries")),
        };
        Ok(Lut {
            first_mapped: descriptor[1],
            bits: bits as u16,
            entries,
        })
    }

    /// The entry for input `x`: inputs below the first mapped value take the first entry, inputs
    /// past the last take the last (PS3.3 C.11.1.1 and C.11.2.1.1).
    pub fn lookup(&self, x: i32) -> u16 {
        let i =
            (i64::from(x) - i64::from(self.first_mapped)).clamp(0, self.entries.len() as i64 - 1);
        self.entries[i as usize]
    }

    /// The largest value an entry can take, `2^bits - 1`.
    pub fn max_output(&self) -> f64 {
        f64::from((1u32 << self.bits) - 1)
    }

    /// The entry for `x` scaled to 8 bits.
    pub fn lookup_8bit(&self, x: i32) -> u8 {
        let v = f64::from(self.lookup(x)) / self.max_output() * 255.0;
        v.round().clamp(0.0, 255.0) as u8
    }
}

/// The data of a LUT as the object holds it.
pub enum LutData<'a> {
    Words(&'a [u16]),
    Bytes(&'a [u8]),
}

/// The three Palette Color LUTs of a PALETTE COLOR image (red, green, blue).
#[derive(Debug, Clone)]
pub struct Palette {
    pub red: Lut,
    pub green: Lut,
    pub blue: Lut,
}

impl Palette {
    /// The 8-bit RGB colour of stored value `x`.
    pub fn rgb(&self, x: i32) -> [u8; 3] {
        [
            palette_8bit(&self.red, x),
            palette_8bit(&self.green, x),
            palette_8bit(&self.blue, x),
        ]
    }
}

/// A palette entry scaled to 8 bits. Palette descriptors say 8 or 16 bits; some 16-bit tables only
/// use the low byte range, which PS3.3 does not allow, so the declared depth is trusted.
fn palette_8bit(lut: &Lut, x: i32) -> u8 {
    let v = lut.lookup(x);
    if lut.bits > 8 {
        (v >> (lut.bits - 8)) as u8
    } else {
        v as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_clamps_to_the_table() {
        // 4 entries starting at input -2, 12 bits each.
        let lut = Lut::new([4, -2, 12], LutData::Words(&[0, 100, 2000, 4095])).unwrap();
        assert_eq!(lut.lookup(-5), 0);
        assert_eq!(lut.lookup(-2), 0);
        assert_eq!(lut.lookup(-1), 100);
        assert_eq!(lut.lookup(0), 2000);
        assert_eq!(lut.lookup(1), 4095);
        assert_eq!(lut.lookup(1000), 4095);
        assert_eq!(lut.max_output(), 4095.0);
        // 2000 / 4095 * 255 = 124.54 -> 125.
        assert_eq!(lut.lookup_8bit(0), 125);
        assert_eq!(lut.lookup_8bit(1), 255);
    }

    #[test]
    fn zero_entries_means_65536() {
        let words: Vec<u16> = (0..=u16::MAX).collect();
        let lut = Lut::new([0, 0, 16], LutData::Words(&words)).unwrap();
        assert_eq!(lut.entries.len(), 65536);
        assert_eq!(lut.lookup(70000), u16::MAX);
    }

    #[test]
    fn eight_bit_tables_may_be_packed_in_words() {
        // Entries 1, 2, 3, 4 packed into two little-endian words.
        let lut = Lut::new([4, 0, 8], LutData::Words(&[0x0201, 0x0403])).unwrap();
        assert_eq!(lut.entries, vec![1, 2, 3, 4]);
        let lut = Lut::new([3, 0, 8], LutData::Bytes(&[7, 8, 9])).unwrap();
        assert_eq!(lut.entries, vec![7, 8, 9]);
        assert!(Lut::new([5, 0, 16], LutData::Words(&[1, 2])).is_err());
        assert!(Lut::new([2, 0, 17], LutData::Words(&[1, 2])).is_err());
    }

    #[test]
    fn palettes_scale_sixteen_bit_entries() {
        let red = Lut::new([2, 10, 16], LutData::Words(&[0xFFFF, 0x8000])).unwrap();
        let green = Lut::new([2, 10, 16], LutData::Words(&[0, 0x0100])).unwrap();
        let blue = Lut::new([2, 10, 8], LutData::Words(&[3, 200])).unwrap();
        let p = Palette { red, green, blue };
        assert_eq!(p.rgb(10), [255, 0, 3]);
        assert_eq!(p.rgb(11), [128, 1, 200]);
        assert_eq!(p.rgb(500), [128, 1, 200]);
    }
}
