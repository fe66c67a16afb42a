//! The text of an HTML fragment as BeautifulSoup (`html.parser` builder, Python 3.11) returns it
//! in `BeautifulSoup(s, "html.parser").text`.
//!
//! Rules (those of Python's `html.parser.HTMLParser` fed the whole string, then closed; and of
//! BeautifulSoup's tree builder on top of it):
//! - Start tags, end tags, comments, declarations and processing instructions are removed; a `<`
//!   that starts none of them is text. An unterminated construct at the end is kept as text.
//! - `script` and `style` content is raw text up to the matching end tag. Text inside `script`,
//!   `style`, `template`, `rt` and `rp` elements is not part of `.text`.
//! - Entity references are decoded only with a terminator (`;` is consumed, any other character
//!   is not); an unknown name stays `&name` (its `;` is dropped). Numeric references below 256
//!   decode as windows-1252 where that code page defines the byte.

use std::sync::OnceLock;

use fancy_regex::Regex;

use llamagen_prep::text::html5_entity as entity;

/// Python's `\s` in a `str` pattern (Unicode whitespace plus U+001C–U+001F).
pub(crate) const PY_S: &str = r"[\s\x1c-\x1f]";

fn re(cell: &'static OnceLock<Regex>, pat: &str) -> &'static Regex {
    cell.get_or_init(|| Regex::new(pat).expect("valid regex"))
}

/// windows-1252 bytes 0x80–0x9F (None where the code page leaves the byte undefined).
const CP1252_HIGH: [Option<char>; 32] = [
    Some('\u{20ac}'),
    None,
    Some('\u{201a}'),
    Some('\u{0192}'),
    Some('\u{201e}'),
    Some('\u{2026}'),
    Some('\u{2020}'),
    Some('\u{2021}'),
    Some('\u{02c6}'),
    Some('\u{2030}'),
    Some('\u{0160}'),
    Some('\u{2039}'),
    Some('\u{0152}'),
    None,
    Some('\u{017d}'),
    None,
    None,
    Some('\u{2018}'),
    Some('\u{2019}'),
    Some('\u{201c}'),
    Some('\u{201d}'),
    Some('\u{2022}'),
    Some('\u{2013}'),
    Some('\u{2014}'),
    Some('\u{02dc}'),
    Some('\u{2122}'),
    Some('\u{0161}'),
    Some('\u{203a}'),
    Some('\u{0153}'),
    None,
    Some('\u{017e}'),
    Some('\u{0178}'),
];

/// windows-1252 decoding of one byte, as Python's codec (undefined bytes fail).
fn cp1252(b: u8) -> Option<char> {
    match b {
        0x80..=0x9f => CP1252_HIGH[(b - 0x80) as usize],
        _ => Some(b as char),
    }
}

/// Elements whose strings BeautifulSoup does not count as text.
const HIDDEN: [&str; 5] = ["script", "style", "template", "rt", "rp"];
/// HTML void elements (closed as soon as they open).
const VOID: [&str; 19] = [
    "area", "base", "br", "col", "embed", "hr", "img", "input", "keygen", "link", "menuitem",
    "meta", "param", "source", "track", "wbr", "basefont", "bgsound", "command",
];

struct Soup {
    text: String,
    open: Vec<String>,
    hidden: usize,
    cdata: Option<String>,
}

impl Soup {
    fn data(&mut self, s: &str) {
        if self.hidden == 0 {
            self.text.push_str(s);
        }
    }
    fn start(&mut self, tag: &str) {
        if VOID.contains(&tag) {
            return;
        }
        if HIDDEN.contains(&tag) {
            self.hidden += 1;
        }
        self.open.push(tag.to_string());
    }
    fn end(&mut self, tag: &str) {
        if let Some(pos) = self.open.iter().rposition(|t| t == tag) {
            for t in self.open.drain(pos..) {
                if HIDDEN.contains(&t.as_str()) {
                    self.hidden -= 1;
                }
            }
        }
    }
    fn charref(&mut self, name: &str) {
        let v = if let Some(h) = name.strip_prefix(['x', 'X']) {
            u64::from_str_radix(h.trim_start_matches(['x', 'X']), 16).ok()
        } else {
            name.parse::<u64>().ok()
        };
        let data = match v {
            Some(v) if v < 256 => cp1252(v as u8).map(String::from),
            Some(v) => u32::try_from(v)
                .ok()
                .and_then(char::from_u32)
                .map(String::from),
            None => None,
        };
        let data = data.filter(|d| !d.is_empty() && d != "\0");
        let d = data.unwrap_or_else(|| "\u{fffd}".into());
        self.data(&d);
    }
}

/// `BeautifulSoup(s, features="html.parser").text`.
pub fn soup_text(s: &str) -> String {
    let mut soup = Soup {
        text: String::with_capacity(s.len()),
        open: Vec::new(),
        hidden: 0,
        cdata: None,
    };
    // feed() then close(): the same loop without and with `end`.
    let rest = goahead(&mut soup, s, false);
    let rest = rest.to_string();
    goahead(&mut soup, &rest, true);
    soup.text
}

fn starts(s: &str, i: usize, p: &str) -> bool {
    s[i..].starts_with(p)
}

fn find_from(s: &str, i: usize, p: &str) -> Option<usize> {
    s.get(i..).and_then(|t| t.find(p)).map(|k| k + i)
}

/// One pass of `HTMLParser.goahead` (with `convert_charrefs=False`, as BeautifulSoup sets it);
/// returns the unconsumed rest.
fn goahead<'a>(soup: &mut Soup, raw: &'a str, end: bool) -> &'a str {
    static ENTITYREF: OnceLock<Regex> = OnceLock::new();
    static CHARREF: OnceLock<Regex> = OnceLock::new();
    static INCOMPLETE: OnceLock<Regex> = OnceLock::new();
    let entityref = re(&ENTITYREF, r"^&([a-zA-Z][-.a-zA-Z0-9]*)[^a-zA-Z0-9]");
    let charref = re(&CHARREF, r"^&#(?:[0-9]+|[xX][0-9a-fA-F]+)[^0-9a-fA-F]");
    let incomplete = re(&INCOMPLETE, r"^&[a-zA-Z#]");
    let n = raw.len();
    let mut i = 0;
    while i < n {
        let j = match &soup.cdata {
            Some(elem) => {
                let pat = format!(r"(?i)</{PY_S}*{elem}{PY_S}*>");
                match Regex::new(&pat)
                    .ok()
                    .and_then(|r| r.find(&raw[i..]).ok().flatten())
                {
                    Some(m) => i + m.start(),
                    None => break,
                }
            }
            None => raw[i..].find(['&', '<']).map(|k| k + i).unwrap_or(n),
        };
        if i < j {
            soup.data(&raw[i..j]);
        }
        i = j;
        if i == n {
            break;
        }
        if starts(raw, i, "<") {
            let next = raw[i + 1..].chars().next();
            let k: isize = if next.is_some_and(|c| c.is_ascii_alphabetic()) {
                parse_starttag(soup, raw, i)
            } else if starts(raw, i, "</") {
                parse_endtag(soup, raw, i)
            } else if starts(raw, i, "<!--") {
                parse_comment(raw, i)
            } else if starts(raw, i, "<?") {
                find_from(raw, i + 2, ">")
                    .map(|p| p as isize + 1)
                    .unwrap_or(-1)
            } else if starts(raw, i, "<!") {
                parse_declaration(raw, i)
            } else if i + 1 < n {
                soup.data("<");
                (i + 1) as isize
            } else {
                break;
            };
            let k = if k < 0 {
                if !end {
                    break;
                }
                let k = match find_from(raw, i + 1, ">") {
                    Some(p) => p + 1,
                    None => find_from(raw, i + 1, "<").unwrap_or(i + 1),
                };
                soup.data(&raw[i..k]);
                k
            } else {
                k as usize
            };
            i = k;
        } else if starts(raw, i, "&#") {
            if let Ok(Some(m)) = charref.find(&raw[i..]) {
                let mt = m.as_str();
                let last = mt.chars().last().expect("non-empty");
                let name = &mt[2..mt.len() - last.len_utf8()];
                soup.charref(name);
                let mut k = i + m.end();
                if last != ';' {
                    k -= last.len_utf8();
                }
                i = k;
                continue;
            } else {
                if raw[i..].contains(';') {
                    soup.data("&#");
                    i += 2;
                }
                break;
            }
        } else {
            // '&'
            if let Ok(Some(c)) = entityref.captures(&raw[i..]) {
                let name = c.get(1).expect("group").as_str();
                match entity(&format!("{name};")) {
                    Some(ch) => soup.data(ch),
                    None => soup.data(&format!("&{name}")),
                }
                let m = c.get(0).expect("match");
                let last = m.as_str().chars().last().expect("non-empty");
                let mut k = i + m.end();
                if last != ';' {
                    k -= last.len_utf8();
                }
                i = k;
                continue;
            }
            if let Ok(Some(m)) = incomplete.find(&raw[i..]) {
                if end && m.end() == n - i {
                    i += 1;
                }
                break;
            } else if i + 1 < n {
                soup.data("&");
                i += 1;
            } else {
                break;
            }
        }
    }
    if end && i < n && soup.cdata.is_none() {
        soup.data(&raw[i..n]);
        i = n;
    }
    &raw[i..]
}

fn parse_comment(raw: &str, i: usize) -> isize {
    // `<!--` ... `-->` (Python 3.11: the first `-->`).
    match find_from(raw, i + 4, "-->") {
        Some(p) => (p + 3) as isize,
        None => -1,
    }
}

fn parse_declaration(raw: &str, i: usize) -> isize {
    if starts(raw, i, "<![") {
        // marked section: `<![CDATA[ ... ]]>` or `<![if ...]>`
        let end = if raw[i + 3..].to_ascii_lowercase().starts_with("cdata[") {
            find_from(raw, i + 3, "]]>").map(|p| p + 3)
        } else {
            find_from(raw, i + 3, "]>").map(|p| p + 2)
        };
        return end.map(|p| p as isize).unwrap_or(-1);
    }
    if raw.len() >= i + 9
        && raw[i..]
            .get(..9)
            .is_some_and(|s| s.eq_ignore_ascii_case("<!doctype"))
    {
        return find_from(raw, i + 9, ">")
            .map(|p| p as isize + 1)
            .unwrap_or(-1);
    }
    // bogus comment
    find_from(raw, i + 2, ">")
        .map(|p| p as isize + 1)
        .unwrap_or(-1)
}

fn tag_name_end(raw: &str, from: usize) -> usize {
    // [a-zA-Z][^\t\n\r\f />\x00]*
    let mut k = from;
    for (off, c) in raw[from..].char_indices() {
        if off > 0 && matches!(c, '\t' | '\n' | '\r' | '\x0c' | ' ' | '/' | '>' | '\0') {
            break;
        }
        k = from + off + c.len_utf8();
    }
    k
}

fn parse_starttag(soup: &mut Soup, raw: &str, i: usize) -> isize {
    static LOCATE: OnceLock<Regex> = OnceLock::new();
    let locate = re(
        &LOCATE,
        &r#"^<[a-zA-Z][^\t\n\r\f />\x00]*(?:[W/]*(?:(?<=['"W/])[^W/>][^W/=>]*(?:[W]*=+[W]*(?:'[^']*'|"[^"]*"|(?!['"])[^>W]*)[W]*)?(?:[W]|/(?!>))*)*)?[W]*"#
            .replace('W', r"\s\x1c-\x1f"),
    );
    let j = match locate.find(&raw[i..]) {
        Ok(Some(m)) => i + m.end(),
        _ => return -1,
    };
    let next = raw[j..].chars().next();
    let endpos: isize = match next {
        Some('>') => (j + 1) as isize,
        Some('/') => {
            if starts(raw, j, "/>") {
                (j + 2) as isize
            } else {
                -1
            }
        }
        None => -1,
        Some(c) if c.is_ascii_alphabetic() || c == '=' => -1,
        Some(_) => {
            if j > i {
                j as isize
            } else {
                (i + 1) as isize
            }
        }
    };
    if endpos < 0 {
        return endpos;
    }
    let endpos_u = endpos as usize;
    let name_end = tag_name_end(raw, i + 1);
    let tag = raw[i + 1..name_end].to_lowercase();
    let tail = raw[..endpos_u].trim_end();
    if !(tail.ends_with('>')) {
        soup.data(&raw[i..endpos_u]);
        return endpos;
    }
    if tail.ends_with("/>") {
        soup.start(&tag);
        soup.end(&tag);
    } else {
        soup.start(&tag);
        if tag == "script" || tag == "style" {
            soup.cdata = Some(tag);
        }
    }
    endpos
}

fn parse_endtag(soup: &mut Soup, raw: &str, i: usize) -> isize {
    static ENDTAG: OnceLock<Regex> = OnceLock::new();
    let endtagfind = re(
        &ENDTAG,
        &format!(r"^</{s}*([a-zA-Z][-.a-zA-Z0-9:_]*){s}*>", s = PY_S),
    );
    let gtpos = match find_from(raw, i + 1, ">") {
        Some(p) => p + 1,
        None => return -1,
    };
    match endtagfind.captures(&raw[i..]) {
        Ok(Some(c)) => {
            let elem = c.get(1).expect("group").as_str().to_lowercase();
            let gt = i + c.get(0).expect("m").end();
            if let Some(cd) = &soup.cdata {
                if &elem != cd {
                    soup.data(&raw[i..gt]);
                    return gt as isize;
                }
            }
            soup.end(&elem);
            soup.cdata = None;
            gt as isize
        }
        _ => {
            if soup.cdata.is_some() {
                soup.data(&raw[i..gtpos]);
                return gtpos as isize;
            }
            let first = raw[i + 2..].chars().next();
            if !first.is_some_and(|c| c.is_ascii_alphabetic()) {
                if starts(raw, i, "</>") {
                    return (i + 3) as isize;
                }
                return find_from(raw, i + 2, ">")
                    .map(|p| p as isize + 1)
                    .unwrap_or(-1);
            }
            let name_end = tag_name_end(raw, i + 2);
            let tag = raw[i + 2..name_end].to_lowercase();
            // tagfind_tolerant also eats trailing whitespace and lone slashes.
            let after = raw[name_end..]
                .char_indices()
                .find(|&(o, c)| {
                    !(c.is_whitespace()
                        || ('\x1c'..='\x1f').contains(&c)
                        || (c == '/' && !raw[name_end + o + 1..].starts_with('>')))
                })
                .map(|(o, _)| name_end + o)
                .unwrap_or(raw.len());
            let gt = find_from(raw, after, ">");
            soup.end(&tag);
            match gt {
                Some(p) => (p + 1) as isize,
                // Python: find() gives -1, so the parser resumes at 0 + ... ; treat as the end.
                None => raw.len() as isize,
            }
        }
    }
}
