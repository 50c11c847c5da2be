"""DICOMweb side of the tests: a `dicomweb_client` bound to a gateway, and readers for DICOM JSON."""

from __future__ import annotations

import io
import warnings

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.datadict import tag_for_keyword

HTTP_TIMEOUT = 30


def client(gw) -> DICOMwebClient:
    c = DICOMwebClient(url=gw.base_url, timeout=HTTP_TIMEOUT)
    c.set_http_retry_params(retry=False)  # a test must see the first answer, not a retried one
    return c


def tag_key(keyword_or_tag: str | int) -> str:
    """'PatientName' / 0x00100010 / '00100010' -> '00100010' (the DICOM JSON key)."""
    if isinstance(keyword_or_tag, int):
        return f"{keyword_or_tag:08X}"
    if len(keyword_or_tag) == 8 and all(c in "0123456789abcdefABCDEF" for c in keyword_or_tag):
        return keyword_or_tag.upper()
    tag = tag_for_keyword(keyword_or_tag)
    assert tag is not None, keyword_or_tag
    return f"{tag:08X}"


def values(obj: dict, keyword: str) -> list | None:
    """The Value array of an attribute in a DICOM JSON object; None if absent, [] if present but empty."""
    elem = obj.get(tag_key(keyword))
    if elem is None:
        return None
    return list(elem.get("Value", []))


def value(obj: dict, keyword: str):
    v = values(obj, keyword)
    return v[0] if v else None


def text(obj: dict, keyword: str) -> str:
    """First value as a string; '' when absent or empty (for comparisons with pydicom's str())."""
    v = value(obj, keyword)
    return "" if v is None else str(v)


def has(obj: dict, keyword: str) -> bool:
    return tag_key(keyword) in obj


def get(gw, path: str, params=None, headers=None, **kw) -> requests.Response:
    """Plain GET on the DICOMweb root (for status codes and headers dicomweb_client hides)."""
    url = path if path.startswith("http") else gw.base_url + path
    return requests.get(url, params=params, headers=headers or {}, timeout=HTTP_TIMEOUT, **kw)


def instance_json(c: DICOMwebClient, sop_uid: str, fields=None) -> list[dict]:
    return c.search_for_instances(search_filters={"SOPInstanceUID": sop_uid}, fields=fields)


def multipart_parts(resp: requests.Response) -> list[tuple[dict[str, str], bytes]]:
    """Split a multipart/related body into (headers, content) parts."""
    ctype = resp.headers.get("Content-Type", "")
    assert ctype.lower().startswith("multipart/related"), f"not multipart/related: {ctype!r}"
    boundary = None
    for item in ctype.split(";")[1:]:
        k, _, v = item.strip().partition("=")
        if k.lower() == "boundary":
            boundary = v.strip().strip('"')
    assert boundary, f"no boundary in {ctype!r}"
    body = resp.content
    delim = b"--" + boundary.encode()
    parts = []
    for chunk in body.split(delim)[1:]:
        if chunk.startswith(b"--"):
            break
        chunk = chunk[2:] if chunk.startswith(b"\r\n") else chunk
        head, _, content = chunk.partition(b"\r\n\r\n")
        if content.endswith(b"\r\n"):
            content = content[:-2]
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            if ":" in line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        parts.append((headers, content))
    return parts


def read_part10(data: bytes):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(io.BytesIO(data))
