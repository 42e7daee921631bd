"""The HTML both pages share (the site report and the model dossier): the frame with its
Content-Security-Policy, the screen and print styles, the inline filter script, tables,
and each ledger record as an expandable block with its full signed statement.

The records can be filtered by text and kind; a link
``page.html#filter=TEXT`` opens the page filtered, ``page.html#rec-SEQ`` with that record
open. A page fetches nothing: images are ``data:`` URIs, the style and the one script are
inline, and the CSP allows exactly that script (by its SHA-256) and nothing from the
network. Every value shown is HTML-escaped.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
from collections.abc import Iterable, Sequence
from typing import Any

from transfer.i18n import Lang, text, when
from transfer.records import Record
from transfer.report_signature import BEGIN, END, envelope_script

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;
max-width:1180px;color:#1d2733;line-height:1.4;padding:0 1em}
h1{margin-bottom:.2em}h2{border-bottom:2px solid #d0d7de;padding-bottom:.2em;margin-top:1.6em}
.sub{color:#57606a}
#verdict{padding:1em 1.2em;border-radius:8px;font-size:1.15em;margin:1em 0}
#verdict.ok{background:#dafbe1;border:2px solid #1a7f37}
#verdict.broken{background:#ffebe9;border:2px solid #cf222e}
table{border-collapse:collapse;width:100%;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #d0d7de;padding:.3em .5em;text-align:left;vertical-align:top}
th{background:#f6f8fa}
td.num{text-align:right;font-variant-numeric:tabular-nums}
code{font-size:.85em;word-break:break-all}
pre{font-size:.78em;background:#f6f8fa;padding:.6em;overflow-x:auto;white-space:pre-wrap;
word-break:break-all}
.transfer{border:1px solid #d0d7de;border-radius:8px;padding:.8em 1em;margin:1em 0}
.pass,.good{color:#1a7f37;font-weight:600}.fail,.bad{color:#cf222e;font-weight:600}
.warn{color:#9a6700;font-weight:600}
tr.bad td{background:#ffebe9}tr.warn td{background:#fff8c5}
img.roc,img.curve{max-width:520px;width:100%;border:1px solid #d0d7de}
.flex{display:flex;gap:1.5em;flex-wrap:wrap}.flex>div{flex:1 1 480px}
details.rec{border:1px solid #d0d7de;border-radius:6px;margin:.3em 0;padding:.2em .6em}
details.rec>summary{cursor:pointer;font-size:.92em}
details.rec[open]{background:#fbfcfd}
.filters{display:flex;gap:1em;align-items:center;margin:.6em 0;flex-wrap:wrap}
.filters input{flex:1 1 320px;padding:.35em;font-size:1em}
#report-signature{margin-top:2em;font-size:.85em;color:#57606a;border-top:1px solid #d0d7de}
@media print{
 body{max-width:none;margin:0;font-size:9.5pt;padding:0}
 .noprint{display:none!important}
 a{color:inherit;text-decoration:none}
 h2{break-after:avoid}
 tr,figure,details.rec,img{break-inside:avoid}
 #verdict.ok,#verdict.broken,tr.bad td,tr.warn td{-webkit-print-color-adjust:exact;
 print-color-adjust:exact}
 img.roc,img.curve{max-width:14cm}
}
@page{size:A4;margin:14mm}
"""

SCRIPT = """(function(){
var q=document.getElementById('rec-filter'),k=document.getElementById('rec-kind'),
n=document.getElementById('rec-count');
function filter(){if(!q)return;var t=q.value.toLowerCase(),kind=k.value,c=0;
document.querySelectorAll('details.rec').forEach(function(d){
var ok=(!kind||d.dataset.kind===kind)&&(!t||d.textContent.toLowerCase().indexOf(t)>=0);
d.hidden=!ok;if(ok)c++;});n.textContent=String(c);}
function reveal(){var h=decodeURIComponent(location.hash.slice(1));if(!h)return;
if(h.indexOf('filter=')===0&&q){q.value=h.slice(7);filter();return;}
var e=document.getElementById(h);if(e&&e.tagName==='DETAILS'){e.hidden=false;e.open=true;}}
if(q){q.addEventListener('input',filter);k.addEventListener('change',filter);filter();}
window.addEventListener('hashchange',reveal);reveal();
})();"""

SCRIPT_HASH = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
CSP = (f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
       f"script-src 'sha256-{SCRIPT_HASH}'")


def e(value: Any) -> str:
    """HTML-escaped text (None shows as nothing)."""
    return html.escape("" if value is None else str(value))


def code(value: Any) -> str:
    return f"<code>{e(value)}</code>"


def table(headers: Sequence[str], rows: Iterable[Sequence[str]],
          row_class: Sequence[str] | None = None) -> str:
    """A table; header texts are escaped, cells are HTML already."""
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{row_class[i]}"' if row_class and row_class[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def dl(pairs: Iterable[tuple[str, str]]) -> str:
    """A two-column table of (escaped label, HTML value)."""
    rows = "".join(f"<tr><th>{e(k)}</th><td>{v}</td></tr>" for k, v in pairs)
    return f"<table class='dl'><tbody>{rows}</tbody></table>"


def verdict_class(value: Any) -> str:
    return "pass" if str(value).startswith("PASS") else "fail"


def verdict(value: Any) -> str:
    return f"<span class='{verdict_class(value)}'>{e(value)}</span>"


def rec_link(record: Record | None) -> str:
    """A link to a record's block on the same page (``#rec-SEQ``)."""
    if record is None:
        return ""
    return f'<a href="#rec-{record.seq}">{e(record.kind.value)} #{record.seq}</a>'


def model_of(record: Record) -> str:
    f = record.fields
    name = f.get("model") or f.get("claimed_model")
    version = f.get("version") or f.get("claimed_version")
    return f"{name}/{version}" if name and version else str(name or "")


def record_block(record: Record, lang: Lang) -> str:
    """One record: a summary line, and when opened its full signed statement."""
    statement = json.dumps(record.statement(), indent=1, ensure_ascii=False, sort_keys=True)
    envelope = json.dumps(json.loads(record.envelope), indent=1)
    subjects = "<br>".join(f"{e(s.name)} {code(s.digest)}" for s in record.subjects) or "—"
    prev = (f'<a href="#rec-{record.seq - 1}">{code(record.prev)}</a>' if record.prev else "—")
    model = model_of(record)
    return (
        f'<details class="rec" id="rec-{record.seq}" data-kind="{e(record.kind.value)}">'
        f"<summary><b>#{record.seq}</b> · {e(when(record.time))} · "
        f"<b>{e(record.kind.value)}</b>{' · ' + e(model) if model else ''} · "
        f"{code(record.id[:19])}</summary>"
        + dl([("id", code(record.id)), (text(lang, "prev"), prev),
              (text(lang, "keyid"), code(record.keyid)),
              (text(lang, "subjects"), subjects)])
        + f"<p><b>{e(text(lang, 'statement'))}</b></p><pre>{e(statement)}</pre>"
        f"<details><summary>DSSE</summary><pre>{e(envelope)}</pre></details></details>")


def records_section(records: Sequence[Record], lang: Lang, section_id: str = "records",
                    title_key: str = "records") -> str:
    """Every record, filterable by text and kind (inline script; nothing fetched)."""
    kinds = sorted({r.kind.value for r in records})
    options = "".join(f'<option value="{e(k)}">{e(k)}</option>' for k in kinds)
    controls = (
        f'<div class="filters noprint"><label for="rec-filter">{e(text(lang, "filter"))}'
        f'</label><input id="rec-filter" type="search" placeholder="'
        f'{e(text(lang, "filter_placeholder"))}"><select id="rec-kind" aria-label="'
        f'{e(text(lang, "kind"))}"><option value="">{e(text(lang, "all_kinds"))}</option>'
        f'{options}</select><span>{e(text(lang, "shown"))}: <b id="rec-count">'
        f"{len(records)}</b></span></div>")
    blocks = "".join(record_block(r, lang) for r in records)
    return (f'<section id="{section_id}"><h2>{e(text(lang, title_key))}</h2>{controls}'
            f"{blocks}</section>")


def page(lang: Lang, title: str, body: str) -> str:
    """The whole page, with an empty signature section to be filled by
    :func:`transfer.report_signature.sign_page`."""
    return (
        f"<!DOCTYPE html><html lang='{lang}'><head><meta charset='utf-8'>"
        f"<meta http-equiv='Content-Security-Policy' content=\"{CSP}\">"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{e(title)}</title><style>{CSS}</style></head><body>"
        f"{body}{BEGIN}{END}<script>{SCRIPT}</script></body></html>\n")


def signature_section(lang: Lang, site: str) -> Any:
    """The filler of the signature section: the digest shown, and the envelope."""
    def fill(digest: str, keyid: str, envelope: str) -> str:
        return (f'<section id="report-signature"><h2>{e(text(lang, "report_signature"))}</h2>'
                "<p>" + text(lang, "report_signature_text", digest=e(digest), site=e(site),
                             keyid=e(keyid)) + "</p>"
                f"{envelope_script(envelope)}</section>")
    return fill
