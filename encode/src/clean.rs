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
//! - Of `ftfy.fix_text`, every step except the mojibake repair (`fix_encoding`: re-decoding text
//!   that was decoded with the wrong code page) is applied: HTML entities (when the text has no
//!   `<`), C1 controls as windows-1252, Latin ligatures, full-width characters, curly quotes, line
//!   breaks, terminal escapes, control characters and NFC.

use std::borrow::Cow;
use std::sync::OnceLock;

use fancy_regex::Regex;
use unicode_normalization::UnicodeNormalization;

use crate::html_text::{self, PY_S, cp1252};

/// Python's `\w` on `str`.
const PY_W: &str = r"[\p{L}\p{N}_]";

/// LlamaGen's text preprocessing: [`clean_caption`] twice.
pub fn text_preprocessing(caption: &str) -> String {
    clean_caption(&clean_caption(caption))
}

/// Python's `str.isspace()`.
fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\x1c'..='\x1f').contains(&c)
}

/// Python's `str.strip()`.
pub(crate) fn py_strip(s: &str) -> &str {
    s.trim_matches(py_space)
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
    c = fix_text(&c);
    c = py_strip(&html_text::unescape(&html_text::unescape(&c))).to_string();
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

/// `ftfy.fix_text` with its default configuration, except the mojibake repair (see the module
/// invariants). Repeats until nothing changes, as ftfy does.
pub fn fix_text(text: &str) -> String {
    let mut t = text.to_string();
    loop {
        let orig = t.clone();
        if !t.contains('<') {
            t = ftfy_unescape_html(&t);
        }
        t = fix_c1_controls(&t);
        t = fix_latin_ligatures(&t);
        t = fix_character_width(&t);
        t = uncurl_quotes(&t);
        t = t
            .replace("\r\n", "\n")
            .replace(['\r', '\u{2028}', '\u{2029}', '\u{85}'], "\n");
        t = remove_terminal_escapes(&t);
        t = remove_control_chars(&t);
        t = t.nfc().collect();
        if t == orig {
            return t;
        }
    }
}

fn ftfy_unescape_html(t: &str) -> String {
    static RE: OnceLock<Regex> = OnceLock::new();
    let re = RE.get_or_init(|| Regex::new(r"&#?[0-9A-Za-z]{1,24};").expect("regex"));
    if !t.contains('&') {
        return t.to_string();
    }
    let mut out = String::with_capacity(t.len());
    let mut last = 0;
    for m in re.find_iter(t).flatten() {
        out.push_str(&t[last..m.start()]);
        last = m.end();
        let s = m.as_str();
        let name = &s[1..];
        let lower = name.to_lowercase();
        let rep: Option<String> = if let Some(c) = entity_exact(name) {
            Some(c.to_string())
        } else if name != lower && name == name.to_uppercase() && !s.starts_with("&#") {
            // ftfy also accepts an all-caps spelling of a lowercase entity, upper-casing its value,
            // unless html.unescape already knows that spelling.
            entity_exact(&lower).map(|c| c.to_uppercase())
        } else if s.starts_with("&#") {
            let u = html_text::unescape(s);
            if u.contains(';') { None } else { Some(u) }
        } else {
            None
        };
        out.push_str(rep.as_deref().unwrap_or(s));
    }
    out.push_str(&t[last..]);
    out
}

fn entity_exact(name_with_semicolon: &str) -> Option<&'static str> {
    let h = crate::html_entities::HTML5;
    h.binary_search_by(|(k, _)| (*k).cmp(name_with_semicolon))
        .ok()
        .map(|i| h[i].1)
}

fn fix_c1_controls(t: &str) -> String {
    t.chars()
        .map(|c| {
            let u = c as u32;
            if (0x80..=0x9f).contains(&u) {
                cp1252(u as u8).unwrap_or(c)
            } else {
                c
            }
        })
        .collect()
}

fn fix_latin_ligatures(t: &str) -> String {
    let mut out = String::with_capacity(t.len());
    for c in t.chars() {
        match c {
            'Ĳ' => out.push_str("IJ"),
            'ĳ' => out.push_str("ij"),
            'ŉ' => out.push_str("ʼn"),
            'Ǳ' => out.push_str("DZ"),
            'ǲ' => out.push_str("Dz"),
            'ǳ' => out.push_str("dz"),
            'Ǆ' => out.push_str("DŽ"),
            'ǅ' => out.push_str("Dž"),
            'ǆ' => out.push_str("dž"),
            'Ǉ' => out.push_str("LJ"),
            'ǈ' => out.push_str("Lj"),
            'ǉ' => out.push_str("lj"),
            'Ǌ' => out.push_str("NJ"),
            'ǋ' => out.push_str("Nj"),
            'ǌ' => out.push_str("nj"),
            'ﬀ' => out.push_str("ff"),
            'ﬁ' => out.push_str("fi"),
            'ﬂ' => out.push_str("fl"),
            'ﬃ' => out.push_str("ffi"),
            'ﬄ' => out.push_str("ffl"),
            'ﬅ' => out.push_str("ſt"),
            'ﬆ' => out.push_str("st"),
            _ => out.push(c),
        }
    }
    out
}

fn fix_character_width(t: &str) -> String {
    let mut out = String::with_capacity(t.len());
    for c in t.chars() {
        let u = c as u32;
        if u == 0x3000 {
            out.push(' ');
        } else if (0xff01..0xfff0).contains(&u) {
            out.extend(std::iter::once(c).nfkc());
        } else {
            out.push(c);
        }
    }
    out
}

fn uncurl_quotes(t: &str) -> String {
    t.chars()
        .map(|c| match c {
            '\u{02bc}' | '\u{2018}'..='\u{201b}' => '\'',
            '\u{201c}'..='\u{201f}' => '"',
            _ => c,
        })
        .collect()
}

fn remove_terminal_escapes(t: &str) -> String {
    static RE: OnceLock<Regex> = OnceLock::new();
    if !t.contains('\x1b') {
        return t.to_string();
    }
    let re = RE.get_or_init(|| Regex::new(r"\x1b\[((?:\d|;)*)([a-zA-Z])").expect("regex"));
    sub(re, t.to_string(), "")
}

fn remove_control_chars(t: &str) -> String {
    t.chars()
        .filter(|&c| {
            let u = c as u32;
            !((0x00..=0x08).contains(&u)
                || u == 0x0b
                || (0x0e..=0x1f).contains(&u)
                || u == 0x7f
                || (0x206a..=0x206f).contains(&u)
                || u == 0xfeff
                || (0xfff9..=0xfffc).contains(&u))
        })
        .collect()
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
