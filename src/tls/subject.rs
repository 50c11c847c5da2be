//! The subject of an X.509 certificate as an RFC 4514 string (`CN=modality1,O=Hospital`), read from
//! its DER encoding: the one field of a client certificate the gateway needs (the peer's identity,
//! the `certificate` pinned in `[[dimse.peers]]`), so a small DER walk instead of an X.509 crate.

/// DER tags met on the way to the subject.
const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
const VERSION: u8 = 0xA0;

/// The subject of the DER certificate `der`, or `None` if it is not a certificate we can read.
pub fn of(der: &[u8]) -> Option<String> {
    let (cert, _) = element(der, SEQUENCE)?;
    let (mut tbs, _) = element(cert, SEQUENCE)?;
    if tbs.first() == Some(&VERSION) {
        tbs = any(tbs)?.2;
    }
    // serialNumber, signature, issuer, validity, then subject.
    for _ in 0..4 {
        tbs = any(tbs)?.2;
    }
    let (name, _) = element(tbs, SEQUENCE)?;
    format_name(name)
}

/// RFC 4514: the relative distinguished names last first, `+` between the attributes of one.
fn format_name(mut name: &[u8]) -> Option<String> {
    let mut rdns = Vec::new();
    while !name.is_empty() {
        let (mut set, rest) = element(name, SET)?;
        name = rest;
        let mut attributes = Vec::new();
        while !set.is_empty() {
            let (mut pair, rest) = element(set, SEQUENCE)?;
            set = rest;
            let (oid, after) = element(pair, OID)?;
            pair = after;
            let (tag, value, _) = any(pair)?;
            attributes.push(format!(
                "{}={}",
                attribute_name(oid),
                escape(&text(tag, value)?)
            ));
        }
        rdns.push(attributes.join("+"));
    }
    rdns.reverse();
    Some(rdns.join(","))
}

/// The short names of RFC 4514 (and the usual emailAddress), else the dotted OID.
fn attribute_name(oid: &[u8]) -> String {
    match oid {
        [0x55, 0x04, 0x03] => "CN".into(),
        [0x55, 0x04, 0x06] => "C".into(),
        [0x55, 0x04, 0x07] => "L".into(),
        [0x55, 0x04, 0x08] => "ST".into(),
        [0x55, 0x04, 0x09] => "STREET".into(),
        [0x55, 0x04, 0x0A] => "O".into(),
        [0x55, 0x04, 0x0B] => "OU".into(),
        [0x09, 0x92, 0x26, 0x89, 0x93, 0xF2, 0x2C, 0x64, 0x01, 0x19] => "DC".into(),
        [0x09, 0x92, 0x26, 0x89, 0x93, 0xF2, 0x2C, 0x64, 0x01, 0x01] => "UID".into(),
        [0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x09, 0x01] => "emailAddress".into(),
        _ => dotted(oid),
    }
}

fn dotted(oid: &[u8]) -> String {
    let mut arcs: Vec<u64> = Vec::new();
    let mut value = 0u64;
    for &b in oid {
        value = (value << 7) | u64::from(b & 0x7F);
        if b & 0x80 == 0 {
            if arcs.is_empty() {
                let first = (value / 40).min(2);
                arcs.push(first);
                arcs.push(value - first * 40);
            } else {
                arcs.push(value);
            }
            value = 0;
        }
    }
    arcs.iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(".")
}

/// A directory string's text: UTF8String, PrintableString, IA5String, TeletexString (taken as
/// Latin-1), BMPString (UCS-2); any other value as `#` and its hex (RFC 4514 2.4).
fn text(tag: u8, value: &[u8]) -> Option<String> {
    Some(match tag {
        0x0C | 0x13 | 0x16 => String::from_utf8(value.to_vec()).ok()?,
        0x14 => value.iter().map(|&b| char::from(b)).collect(),
        0x1E => char::decode_utf16(
            value
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]])),
        )
        .collect::<Result<_, _>>()
        .ok()?,
        _ => {
            let hex: String = value.iter().map(|b| format!("{b:02x}")).collect();
            return Some(format!("#{hex}"));
        }
    })
}

/// RFC 4514 2.4: backslash before the special characters, a leading `#` or space, a trailing space.
fn escape(value: &str) -> String {
    if value.starts_with('#')
        && value.len() > 1
        && value[1..].bytes().all(|b| b.is_ascii_hexdigit())
    {
        return value.to_string();
    }
    let last = value.chars().count().saturating_sub(1);
    let mut out = String::with_capacity(value.len());
    for (i, c) in value.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && matches!(c, '#' | ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The element at the start of `der` if it has tag `tag`: its content and what follows it.
fn element(der: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (found, content, rest) = any(der)?;
    (found == tag).then_some((content, rest))
}

/// The element at the start of `der`: its tag, content and what follows it (single-byte tags and
/// definite lengths only, as DER has).
fn any(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7F);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        rest = &rest[n..];
        len
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A DER element of `tag` holding `content`.
    fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        if content.len() < 0x80 {
            out.push(content.len() as u8);
        } else {
            out.push(0x82);
            out.extend_from_slice(&(content.len() as u16).to_be_bytes());
        }
        out.extend_from_slice(content);
        out
    }

    fn attribute(oid: &[u8], tag: u8, value: &str) -> Vec<u8> {
        let pair = [tlv(OID, oid), tlv(tag, value.as_bytes())].concat();
        tlv(SEQUENCE, &pair)
    }

    /// A certificate skeleton: only what the walk reads is real.
    fn certificate(subject: &[u8]) -> Vec<u8> {
        let issuer = tlv(SEQUENCE, &tlv(SET, &attribute(&[0x55, 4, 3], 0x0C, "CA")));
        let tbs = [
            tlv(VERSION, &tlv(0x02, &[2])),
            tlv(0x02, &[0x01, 0x23]),
            tlv(SEQUENCE, &tlv(OID, &[0x2A, 0x86, 0x48])),
            issuer,
            tlv(SEQUENCE, &[0u8; 200]),
            tlv(SEQUENCE, subject),
            tlv(SEQUENCE, &[]),
        ]
        .concat();
        tlv(
            SEQUENCE,
            &[tlv(SEQUENCE, &tbs), tlv(SEQUENCE, &[]), tlv(0x03, &[0])].concat(),
        )
    }

    #[test]
    fn subject_is_written_last_rdn_first_with_escapes() {
        let subject = [
            tlv(SET, &attribute(&[0x55, 4, 6], 0x13, "NL")),
            tlv(SET, &attribute(&[0x55, 4, 10], 0x0C, "Hospital, West")),
            tlv(
                SET,
                &[
                    attribute(&[0x55, 4, 3], 0x0C, "modality1"),
                    attribute(&[0x55, 4, 11], 0x13, "CT"),
                ]
                .concat(),
            ),
            tlv(SET, &attribute(&[0x2B, 6, 1, 4, 1, 0x82, 0x37], 0x0C, "x")),
        ]
        .concat();
        assert_eq!(
            of(&certificate(&subject)).as_deref(),
            Some("1.3.6.1.4.1.311=x,CN=modality1+OU=CT,O=Hospital\\, West,C=NL")
        );
    }

    #[test]
    fn truncated_or_foreign_input_gives_none() {
        let der = certificate(&tlv(SET, &attribute(&[0x55, 4, 3], 0x0C, "a")));
        assert_eq!(of(&der).as_deref(), Some("CN=a"));
        for cut in [1, 10, der.len() / 2, der.len() - 1] {
            assert_eq!(of(&der[..cut]), None, "cut at {cut}");
        }
        assert_eq!(of(b"-----BEGIN CERTIFICATE-----"), None);
    }
}
