//! Media types and transfer syntaxes of DICOMweb responses (PS3.18 8.7): Accept header parsing and
//! the media type of each compressed transfer syntax.

pub const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";
pub const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";
pub const EXPLICIT_VR_BE: &str = "1.2.840.10008.1.2.2";
pub const DEFLATED_EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1.99";

/// One acceptable representation from an Accept header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acceptable {
    /// For multipart: the `type` parameter; otherwise the media type itself.
    pub media_type: String,
    pub multipart: bool,
    /// `transfer-syntax` parameter: None = default, Some("*") = as stored.
    pub transfer_syntax: Option<String>,
}

/// Parses an Accept header into its representations, best (highest q) first.
pub fn parse_accept(header: Option<&str>) -> Vec<Acceptable> {
    let header = header.unwrap_or("*/*");
    let mut items: Vec<(f32, usize, Acceptable)> = Vec::new();
    for (pos, item) in split_outside_quotes(header, ',').into_iter().enumerate() {
        let mut parts = split_outside_quotes(&item, ';').into_iter();
        let media = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
        if media.is_empty() {
            continue;
        }
        let mut q = 1.0f32;
        let mut inner_type = None;
        let mut ts = None;
        for p in parts {
            let Some((k, v)) = p.split_once('=') else {
                continue;
            };
            let v = v.trim().trim_matches('"').to_string();
            match k.trim().to_ascii_lowercase().as_str() {
                "q" => q = v.parse().unwrap_or(0.0),
                "type" => inner_type = Some(v.to_ascii_lowercase()),
                "transfer-syntax" => ts = Some(v),
                _ => {}
            }
        }
        let acceptable = if media == "multipart/related" {
            Acceptable {
                media_type: inner_type.unwrap_or_else(|| "*/*".into()),
                multipart: true,
                transfer_syntax: ts,
            }
        } else {
            Acceptable {
                media_type: media,
                multipart: false,
                transfer_syntax: ts,
            }
        };
        if q > 0.0 {
            items.push((q, pos, acceptable));
        }
    }
    items.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    items.into_iter().map(|(_, _, a)| a).collect()
}

fn split_outside_quotes(s: &str, sep: char) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in s.chars() {
        if c == '"' {
            quoted = !quoted;
        }
        if c == sep && !quoted {
            out.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out
}

/// The media type a compressed frame of `ts` is returned as (PS3.18 Table 8.7.3-2), if encapsulated.
pub fn frame_media_type(ts: &str) -> Option<&'static str> {
    Some(match ts {
        "1.2.840.10008.1.2.4.50"
        | "1.2.840.10008.1.2.4.51"
        | "1.2.840.10008.1.2.4.57"
        | "1.2.840.10008.1.2.4.70" => "image/jpeg",
        "1.2.840.10008.1.2.4.80" | "1.2.840.10008.1.2.4.81" => "image/jls",
        "1.2.840.10008.1.2.4.90" | "1.2.840.10008.1.2.4.91" => "image/jp2",
        "1.2.840.10008.1.2.4.92" | "1.2.840.10008.1.2.4.93" => "image/jpx",
        "1.2.840.10008.1.2.4.201" | "1.2.840.10008.1.2.4.202" | "1.2.840.10008.1.2.4.203" => {
            "image/jphc"
        }
        "1.2.840.10008.1.2.4.110" | "1.2.840.10008.1.2.4.111" | "1.2.840.10008.1.2.4.112" => {
            "image/jxl"
        }
        "1.2.840.10008.1.2.5" => "image/dicom-rle",
        "1.2.840.10008.1.2.4.100"
        | "1.2.840.10008.1.2.4.100.1"
        | "1.2.840.10008.1.2.4.101"
        | "1.2.840.10008.1.2.4.101.1" => "video/mpeg",
        "1.2.840.10008.1.2.4.102"
        | "1.2.840.10008.1.2.4.102.1"
        | "1.2.840.10008.1.2.4.103"
        | "1.2.840.10008.1.2.4.103.1"
        | "1.2.840.10008.1.2.4.104"
        | "1.2.840.10008.1.2.4.104.1"
        | "1.2.840.10008.1.2.4.105"
        | "1.2.840.10008.1.2.4.105.1"
        | "1.2.840.10008.1.2.4.106"
        | "1.2.840.10008.1.2.4.106.1" => "video/mp4",
        "1.2.840.10008.1.2.4.107" | "1.2.840.10008.1.2.4.108" => "video/H265",
        _ => return None,
    })
}

/// Native (uncompressed) encodings; everything else is encapsulated.
pub fn is_native(ts: &str) -> bool {
    matches!(
        ts,
        EXPLICIT_VR_LE | IMPLICIT_VR_LE | EXPLICIT_VR_BE | DEFLATED_EXPLICIT_VR_LE
    )
}

/// Does `media_type` (possibly a wildcard) cover `concrete`?
pub fn media_matches(media_type: &str, concrete: &str) -> bool {
    if media_type == "*/*" || media_type.eq_ignore_ascii_case(concrete) {
        return true;
    }
    match (media_type.split_once('/'), concrete.split_once('/')) {
        (Some((t, "*")), Some((ct, _))) => t.eq_ignore_ascii_case(ct),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_with_quoted_and_unquoted_parameters() {
        let a = parse_accept(Some(
            "multipart/related; type=\"application/dicom\"; transfer-syntax=*",
        ));
        assert_eq!(
            a,
            vec![Acceptable {
                media_type: "application/dicom".into(),
                multipart: true,
                transfer_syntax: Some("*".into())
            }]
        );
        let a = parse_accept(Some(
            "multipart/related;type=application/octet-stream, image/jpeg;q=0.5",
        ));
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].media_type, "application/octet-stream");
        assert!(a[0].multipart);
        assert!(!a[1].multipart);
    }

    #[test]
    fn accept_orders_by_quality() {
        let a = parse_accept(Some("image/png;q=0.2, image/jpeg;q=0.9, text/html;q=0"));
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].media_type, "image/jpeg");
    }

    #[test]
    fn missing_accept_is_anything() {
        assert_eq!(parse_accept(None)[0].media_type, "*/*");
        assert!(media_matches("image/*", "image/jpeg"));
        assert!(!media_matches("image/*", "video/mp4"));
    }
}
