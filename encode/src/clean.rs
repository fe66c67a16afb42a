//! Caption cleaning before T5 tokenisation, as LlamaGen's `T5Embedder.text_preprocessing` does
//! it: PixArt's (originally DeepFloyd IF's) `clean_caption`, applied twice.
//!
//! Invariants:
//! - [`clean_caption`] applies the original's steps in the original order: percent-decoding
//!   (`unquote_plus`), lowercase, URL removal, HTML to text (BeautifulSoup `html.parser`), CJK
//!   removal, dash/quote normalisation, the id/filename/number/punctuation regexes, `ftfy.fix_text`,
//!   double `html.unescape` and strip, the spam-phrase regexes, whitespace collapse and the final
//!   quote/punctuation trims.
//! - Character classes follow Python's `re` on `str`: `\s` includes U+001C–U+001F, `\w` is
//!   letters, numbers and `_`.
//! - `ftfy.fix_text` (all its default fixes except the mojibake repair), `html.unescape` and
//!   `str.strip` are Python's (`llamagen_prep::text`, which the CLIP tokenizer's cleaning uses too).

use std::borrow::Cow;
use std::sync::OnceLock;

use fancy_regex::Regex;
use llamagen_prep::text::{ftfy_fix_text, html_unescape, py_strip};

use crate::html_text::{self, PY_S};

/// Python's `\w` on `str`.
const PY_W: &str = r"[\p{L}\p{N}_]";

/// LlamaGen's text preprocessing: [`clean_caption`] twice.
pub fn text_preprocessing(caption: &str) -> String {
    clean_caption(&clean_caption(caption))
}

/// `urllib.parse.unquote_plus` (UTF-8, invalid sequences replaced by U+FFFD).
pub fn unquote_plus(s: &str) -> String {
    let s = s.replace('+', " ");
    if !s.contains('%') {
        return s;
    }
    let mut out = String::with_capacity(s.len());
    let mut buf: Vec<u8> = Vec::new();
    let hex = |b: u8| (b as char).to_digit(16);
    let mut chars = s.char_indices().peekable();
    let bytes = s.as_bytes();
    while let Some((i, c)) = chars.next() {
        if !c.is_ascii() {
            out.push_str(&String::from_utf8_lossy(&buf));
            buf.clear();
            out.push(c);
            continue;
        }
        if c == '%'
            && bytes.get(i + 1).copied().and_then(hex).is_some()
            && bytes.get(i + 2).copied().and_then(hex).is_some()
        {
            let v = hex(bytes[i + 1]).expect("hex") * 16 + hex(bytes[i + 2]).expect("hex");
            buf.push(v as u8);
            chars.next();
            chars.next();
            continue;
        }
        buf.push(c as u8);
    }
    out.push_str(&String::from_utf8_lossy(&buf));
    out
}

struct Rules {
    url1: Regex,
    url2: Regex,
    nick: Regex,
    cjk: Regex,
    dash: Regex,
    dquote: Regex,
    squote: Regex,
    quot: Regex,
    amp: Regex,
    ip: Regex,
    article: Regex,
    lit_nl: Regex,
    hash3: Regex,
    hash5: Regex,
    digits6: Regex,
    filename: Regex,
    quotes2: Regex,
    dots2: Regex,
    bad_punct: Regex,
    spaced_dot: Regex,
    dash_us: Regex,
    id1: Regex,
    id2: Regex,
    id3: Regex,
    shipping: Regex,
    download: Regex,
    click: Regex,
    ext: Regex,
    page: Regex,
    id4: Regex,
    size: Regex,
    colon: Regex,
    punct_space: Regex,
    spaces: Regex,
    outer_quotes: Regex,
    lead_punct: Regex,
    trail_punct: Regex,
    dotword: Regex,
}

fn rules() -> &'static Rules {
    static R: OnceLock<Rules> = OnceLock::new();
    R.get_or_init(|| {
        let r = |p: String| Regex::new(&p).unwrap_or_else(|e| panic!("regex {p}: {e}"));
        let (s, w) = (PY_S, PY_W);
        let not_s = r"[^\s\x1c-\x1f]";
        let url_tail = format!(
            r"[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)(?:{w}|[/-])*\b/?(?!@)"
        );
        Rules {
            url1: r(format!(r"\b((?:https?:(?:/{{1,3}}|[a-zA-Z0-9%])|{url_tail}))")),
            url2: r(format!(r"\b((?:www:(?:/{{1,3}}|[a-zA-Z0-9%])|{url_tail}))")),
            nick: r(format!(r"@(?:{w}|\d)+\b")),
            cjk: r(r"[\u31c0-\u31ef]+|[\u31f0-\u31ff]+|[\u3200-\u32ff]+|[\u3300-\u33ff]+|[\u3400-\u4dbf]+|[\u4dc0-\u4dff]+|[\u4e00-\u9fff]+".into()),
            dash: r(r"[\u002D\u058A\u05BE\u1400\u1806\u2010-\u2015\u2E17\u2E1A\u2E3A\u2E3B\u2E40\u301C\u3030\u30A0\uFE31\uFE32\uFE58\uFE63\uFF0D]+".into()),
            dquote: r("[`´«»“”¨]".into()),
            squote: r("[‘’]".into()),
            quot: r("&quot;?".into()),
            amp: r("&amp".into()),
            ip: r(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}".into()),
            article: r(format!(r"\d:\d\d{s}+$")),
            lit_nl: r(r"\\n".into()),
            hash3: r(r"#\d{1,3}\b".into()),
            hash5: r(r"#\d{5,}\b".into()),
            digits6: r(r"\b\d{6,}\b".into()),
            filename: r(format!(r"{not_s}+\.(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)")),
            quotes2: r(r#"["']{2,}"#.into()),
            dots2: r(r"[\.]{2,}".into()),
            bad_punct: r(r"[#®•©™&@·º½¾¿¡§~\)\(\]\[\}\{\|\\/\*]{1,}".into()),
            spaced_dot: r(format!(r"{s}+\.{s}+")),
            dash_us: r(r"(?:\-|\_)".into()),
            id1: r(r"\b[a-zA-Z]{1,3}\d{3,15}\b".into()),
            id2: r(r"\b[a-zA-Z]+\d+[a-zA-Z]+\b".into()),
            id3: r(r"\b\d+[a-zA-Z]+\d+\b".into()),
            shipping: r(format!(r"(worldwide{s}+)?(free{s}+)?shipping")),
            download: r(format!(r"(free{s})?download({s}free)?")),
            click: r(format!(r"\bclick\b{s}(?:for|on){s}{w}+")),
            ext: r(format!(r"\b(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)({s}image[s]?)?")),
            page: r(format!(r"\bpage{s}+\d+\b")),
            id4: r(r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b".into()),
            size: r(r"\b\d+\.?\d*[xх×]\d+\.?\d*\b".into()),
            colon: r(format!(r"\b{s}+\:{s}+")),
            punct_space: r(r"(\D[,\./])\b".into()),
            spaces: r(format!(r"{s}+")),
            outer_quotes: r(r#"(?s)^["']([\s\S]+)["']$"#.into()),
            lead_punct: r(r"^['_,\-:;]".into()),
            trail_punct: r(r"['_,\-:\-\+]$".into()),
            dotword: r(format!(r"^\.{not_s}+$")),
        }
    })
}

fn sub(re: &Regex, text: String, rep: &str) -> String {
    // No match, or a backtracking limit hit on pathological input: the text stays as it is.
    let replaced = match re.try_replacen(&text, 0, rep) {
        Ok(Cow::Owned(s)) => Some(s),
        _ => None,
    };
    replaced.unwrap_or(text)
}

/// PixArt's `clean_caption` (one pass).
pub fn clean_caption(caption: &str) -> String {
    let r = rules();
    let mut c = unquote_plus(caption);
    c = py_strip(&c).to_lowercase();
    c = c.replace("<person>", "person");
    c = sub(&r.url1, c, "");
    c = sub(&r.url2, c, "");
    c = html_text::soup_text(&c);
    c = sub(&r.nick, c, "");
    c = sub(&r.cjk, c, "");
    c = sub(&r.dash, c, "-");
    c = sub(&r.dquote, c, "\"");
    c = sub(&r.squote, c, "'");
    c = sub(&r.quot, c, "");
    c = sub(&r.amp, c, "");
    c = sub(&r.ip, c, " ");
    c = sub(&r.article, c, "");
    c = sub(&r.lit_nl, c, " ");
    c = sub(&r.hash3, c, "");
    c = sub(&r.hash5, c, "");
    c = sub(&r.digits6, c, "");
    c = sub(&r.filename, c, "");
    c = sub(&r.quotes2, c, "\"");
    c = sub(&r.dots2, c, " ");
    c = sub(&r.bad_punct, c, " ");
    c = sub(&r.spaced_dot, c, " ");
    if r.dash_us.find_iter(&c).count() > 3 {
        c = sub(&r.dash_us, c, " ");
    }
    c = ftfy_fix_text(&c);
    c = py_strip(&html_unescape(&html_unescape(&c))).to_string();
    c = sub(&r.id1, c, "");
    c = sub(&r.id2, c, "");
    c = sub(&r.id3, c, "");
    c = sub(&r.shipping, c, "");
    c = sub(&r.download, c, "");
    c = sub(&r.click, c, "");
    c = sub(&r.ext, c, "");
    c = sub(&r.page, c, "");
    c = sub(&r.id4, c, " ");
    c = sub(&r.size, c, "");
    c = sub(&r.colon, c, ": ");
    c = sub(&r.punct_space, c, "${1} ");
    c = sub(&r.spaces, c, " ");
    c = sub(&r.outer_quotes, c, "${1}");
    c = sub(&r.lead_punct, c, "");
    c = sub(&r.trail_punct, c, "");
    c = sub(&r.dotword, c, "");
    py_strip(&c).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unquote_plus_decodes_utf8_runs() {
        assert_eq!(unquote_plus("caf%C3%A9+au+lait"), "café au lait");
        assert_eq!(unquote_plus("100%"), "100%");
        assert_eq!(unquote_plus("%zz%4"), "%zz%4");
        assert_eq!(unquote_plus("%FF"), "\u{fffd}");
    }

    #[test]
    fn removes_urls_and_html() {
        assert_eq!(
            text_preprocessing("A <b>bold</b> cat visit https://example.com/x now"),
            "a bold cat visit now"
        );
    }
}
