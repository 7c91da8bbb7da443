//! A JSON document parsed only as deep as someone looks into it.
//!
//! The pod in a review is kilobytes of JSON of which a template touches a few fields. Parsing
//! all of it into `serde_json::Value` trees (a map and a `String` per key), cloning it for the
//! merge and dropping both copies was most of an admission's cost. A [`Node`] starts as the raw
//! text of the request, validated once by serde_json; [`Node::as_object_mut`] and
//! [`Node::as_array_mut`] split one level when the merge descends (nested values are skipped
//! through the bracket pairs of the [`Document`]), and values from the template are borrowed,
//! not copied. Whatever the merge never opened stays the same slice of the request, so the diff
//! skips it by comparing two pointers.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use serde_json::value::RawValue;
use serde_json::Value;

/// The deepest nesting of objects and arrays a request may have (README "Admission behaviour").
pub const MAX_DEPTH: usize = 128;

/// What serde_json lets through when it skips a value unparsed (as it does for the `RawValue`
/// of a review's object) but refuses when it parses one into a `Value`. Bodies with any of these
/// are refused at the door, so every part of a [`Document`] reads back as a `Value`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unreadable {
    #[error("JSON nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("number out of range at byte {0}")]
    Number(usize),
    #[error("invalid \\u escape (a lone surrogate) in the string at byte {0}")]
    Escape(usize),
}

/// Checks JSON text that serde_json has accepted as syntax: nesting at most [`MAX_DEPTH`] deep,
/// every number within `f64` range, every `\u` escape a character. One pass over the bytes;
/// numbers and strings are only parsed when they could fail (an exponent or more than 15
/// characters; a `\u`).
pub fn check(b: &[u8]) -> Result<(), Unreadable> {
    scan(b, true).map(drop)
}

/// [`check`] and the bracket pairs of `b` ([`Document`]) in the same pass: a review body is
/// checked once, and the object's document reuses the pairs instead of scanning again.
pub fn check_and_pair(b: &[u8]) -> Result<Vec<(u32, u32)>, Unreadable> {
    scan(b, true)
}

/// The bracket pairs of `part` (offsets in `part`), a value found in `body`, from the pairs of
/// `body` ([`check_and_pair`]). `part` may be a copy (serde_json copies a `RawValue`): equal text
/// has equal pairs. `None` when `part` is not a bracketed value of `body`.
pub fn pairs_within(part: &str, body: &[u8], body_pairs: &[(u32, u32)]) -> Option<Vec<(u32, u32)>> {
    let part = part.trim().as_bytes();
    let at = body_pairs.iter().position(|&(open, close)| {
        (close - open) as usize + 1 == part.len() && body.get(open as usize..=close as usize) == Some(part)
    })?;
    let (open, close) = body_pairs[at];
    Some(body_pairs[at..].iter().take_while(|p| p.0 <= close).map(|p| (p.0 - open, p.1 - open)).collect())
}

/// The one pass behind [`check`] and [`bracket_pairs`]: every `{}`/`[]` pair by opening offset,
/// and with `checking`, the checks of [`check`].
fn scan(b: &[u8], checking: bool) -> Result<Vec<(u32, u32)>, Unreadable> {
    // Each pair gets its slot when it opens, so the list comes out sorted; `open` holds the
    // slots of the brackets not closed yet (its length is the depth).
    let (mut pairs, mut open) = (Vec::new(), Vec::new());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'"' => {
                let (end, has_u_escape) = split::string_end_noting_u_escapes(b, i);
                if checking && has_u_escape && serde_json::from_slice::<String>(&b[i..end]).is_err() {
                    return Err(Unreadable::Escape(i));
                }
                i = end;
                continue;
            }
            b'{' | b'[' => {
                open.push(pairs.len());
                if checking && open.len() > MAX_DEPTH {
                    return Err(Unreadable::TooDeep);
                }
                pairs.push((i as u32, u32::MAX));
            }
            b'}' | b']' => {
                if let Some(slot) = open.pop() {
                    pairs[slot].1 = i as u32;
                }
            }
            b'-' | b'0'..=b'9' if checking => {
                let len =
                    b[i..].iter().take_while(|c| matches!(c, b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')).count();
                let token = &b[i..i + len];
                let may_overflow = len > 15 || token.iter().any(|c| matches!(c, b'e' | b'E'));
                let finite =
                    || std::str::from_utf8(token).ok().and_then(|t| t.parse::<f64>().ok()).is_some_and(f64::is_finite);
                if may_overflow && !finite() {
                    return Err(Unreadable::Number(i));
                }
                i += len;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    // Unclosed brackets (broken text only) have no end: drop them rather than mislead.
    if !open.is_empty() {
        pairs.retain(|p| p.1 != u32::MAX);
    }
    Ok(pairs)
}

/// One JSON value of a document.
#[derive(Debug, Clone)]
pub enum Node<'a> {
    /// Not looked into yet: a part of a [`Document`]'s text, as received.
    Raw(Raw<'a>),
    Object(Object<'a>),
    Array(Array<'a>),
    /// A value that is not from the document: borrowed from a template, or made by the merge.
    Value(Cow<'a, Value>),
}

/// The text of a request's object, checked by serde_json, with the position of every
/// bracket's match, found in one pass. Opening a level then skips each nested value in one
/// lookup instead of scanning it: each byte is scanned about once, however deep the merge goes.
///
/// A template keeps its podSpec as an owned document (`Document<'static>`) of canonical JSON:
/// a fraction of the memory of a `serde_json::Value` tree, read by the merge the same way.
#[derive(Debug, Clone, PartialEq)]
pub struct Document<'a> {
    text: Cow<'a, str>,
    /// (opening, closing) byte offsets of every `{}` and `[]` pair, by opening offset.
    pairs: Vec<(u32, u32)>,
}

impl<'a> Document<'a> {
    pub fn new(raw: &'a RawValue) -> Self {
        Document::over(raw.get().trim())
    }

    /// Any text: what is not valid JSON just fails to open (the tests feed it broken text).
    pub(crate) fn over(text: &'a str) -> Self {
        Document { pairs: bracket_pairs(text.as_bytes()).unwrap_or_default(), text: Cow::Borrowed(text) }
    }

    /// The document of `raw` with its bracket pairs known already ([`pairs_within`]): no
    /// second pass over the text.
    pub fn with_pairs(raw: &'a RawValue, pairs: Vec<(u32, u32)>) -> Self {
        Document { text: Cow::Borrowed(raw.get().trim()), pairs }
    }

    /// A document owning its text (valid JSON, as serde_json writes it).
    pub fn owned(text: String) -> Document<'static> {
        let mut pairs = bracket_pairs(text.as_bytes()).unwrap_or_default();
        pairs.shrink_to_fit();
        Document { text: Cow::Owned(text), pairs }
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn root(&self) -> Node<'_> {
        Node::Raw(Raw { text: &self.text, doc: self })
    }

    /// The offset after the bracket matching the one at `open`.
    fn end_of(&self, open: usize) -> Option<usize> {
        let at = self.pairs.binary_search_by_key(&u32::try_from(open).ok()?, |p| p.0).ok()?;
        Some(self.pairs[at].1 as usize + 1)
    }
}

/// The bracket pairs of `b`, sorted by opening offset (`None` past 4 GiB).
fn bracket_pairs(b: &[u8]) -> Option<Vec<(u32, u32)>> {
    u32::try_from(b.len()).ok()?;
    scan(b, false).ok()
}

/// A part of a [`Document`]: valid JSON without surrounding whitespace.
#[derive(Clone, Copy)]
pub struct Raw<'a> {
    text: &'a str,
    doc: &'a Document<'a>,
}

impl std::fmt::Debug for Raw<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Raw({})", self.text)
    }
}

impl<'a> Raw<'a> {
    pub fn text(&self) -> &'a str {
        self.text
    }

    /// The very same part of the same document (not just equal text).
    pub fn same(&self, other: &Raw<'_>) -> bool {
        std::ptr::eq(self.text, other.text)
    }

    fn sub(&self, range: std::ops::Range<usize>) -> Option<Raw<'a>> {
        Some(Raw { text: self.text.get(range)?, doc: self.doc })
    }

    /// The offset after the value that starts at `i` with a bracket.
    fn bracket_end(&self, i: usize) -> Option<usize> {
        let base = self.text.as_ptr() as usize - self.doc.text.as_ptr() as usize;
        self.doc.end_of(base + i).map(|end| end - base)
    }
}

/// The kind of a JSON value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Null,
    Bool,
    Number,
    String,
    Array,
    Object,
}

/// A JSON object's entries in document order; keys are unique (the last of duplicates wins,
/// as in `serde_json::Value` and Go).
#[derive(Debug, Clone, Default)]
pub struct Object<'a> {
    entries: Vec<(Cow<'a, str>, Node<'a>)>,
    /// When opened from raw text: that text and the entries as first split, so the diff
    /// does not split the original again.
    source: Option<(Raw<'a>, Box<Object<'a>>)>,
}

/// An array's elements; see [`Object`] for `source`.
#[derive(Debug, Clone, Default)]
pub struct Array<'a> {
    items: Vec<Node<'a>>,
    source: Option<(Raw<'a>, Vec<Node<'a>>)>,
}

/// Above this many entries, comparing two objects key by key goes through a hash set.
const LINEAR_LOOKUP_MAX: usize = 16;

impl<'a> Object<'a> {
    pub fn get(&self, key: &str) -> Option<&Node<'a>> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut Node<'a>> {
        self.entries.iter_mut().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Sets `key`, in place when it exists, else at the end.
    pub fn insert(&mut self, key: impl Into<Cow<'a, str>>, value: Node<'a>) {
        let key = key.into();
        match self.get_mut(&key) {
            Some(slot) => *slot = value,
            None => self.entries.push((key, value)),
        }
    }

    pub fn remove(&mut self, key: &str) -> Option<Node<'a>> {
        let at = self.entries.iter().position(|(k, _)| k == key)?;
        Some(self.entries.remove(at).1)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Node<'a>)> {
        self.entries.iter().map(|(k, v)| (k.as_ref(), v))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// `self[key]` as an object: opened, or created (replacing a value that is not an object).
    pub fn object_entry(&mut self, key: &'a str) -> &mut Object<'a> {
        let at = match self.entries.iter().position(|(k, _)| k == key) {
            Some(at) => at,
            None => {
                self.entries.push((Cow::Borrowed(key), Node::Object(Object::default())));
                self.entries.len() - 1
            }
        };
        let slot = &mut self.entries[at].1;
        if slot.kind() != Kind::Object {
            *slot = Node::Object(Object::default());
        }
        slot.as_object_mut().expect("just made an object")
    }

    /// Lookups by key that stay fast on objects with many keys (a hostile pod's labels).
    pub fn index(&self) -> Index<'_, 'a> {
        if self.entries.len() > LINEAR_LOOKUP_MAX {
            Index::Hashed(self.entries.iter().map(|(k, v)| (k.as_ref(), v)).collect())
        } else {
            Index::Linear(self)
        }
    }

    /// Keeps the last of duplicate keys, in the position of the first.
    fn dedup_keep_last(&mut self) {
        let has_duplicates = if self.entries.len() <= LINEAR_LOOKUP_MAX {
            self.entries.iter().enumerate().any(|(i, (k, _))| self.entries[..i].iter().any(|(p, _)| p == k))
        } else {
            let mut seen = HashSet::with_capacity(self.entries.len());
            !self.entries.iter().all(|(k, _)| seen.insert(k.as_ref()))
        };
        if has_duplicates {
            let mut unique = Object::default();
            for (k, v) in std::mem::take(&mut self.entries) {
                unique.insert(k, v);
            }
            self.entries = unique.entries;
        }
    }
}

impl<'a> IntoIterator for Object<'a> {
    type Item = (Cow<'a, str>, Node<'a>);
    type IntoIter = std::vec::IntoIter<(Cow<'a, str>, Node<'a>)>;

    fn into_iter(self) -> Self::IntoIter {
        self.entries.into_iter()
    }
}

/// See [`Object::index`].
pub enum Index<'o, 'a> {
    Linear(&'o Object<'a>),
    Hashed(HashMap<&'o str, &'o Node<'a>>),
}

impl<'o, 'a> Index<'o, 'a> {
    pub fn get(&self, key: &str) -> Option<&'o Node<'a>> {
        match self {
            Index::Linear(o) => o.get(key),
            Index::Hashed(map) => map.get(key).copied(),
        }
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }
}

impl<'a> Node<'a> {
    pub fn kind(&self) -> Kind {
        match self {
            Node::Raw(raw) => match raw.text.as_bytes().first() {
                Some(b'{') => Kind::Object,
                Some(b'[') => Kind::Array,
                Some(b'"') => Kind::String,
                Some(b'n') => Kind::Null,
                Some(b't' | b'f') => Kind::Bool,
                _ => Kind::Number,
            },
            Node::Object(_) => Kind::Object,
            Node::Array(_) => Kind::Array,
            Node::Value(v) => match v.as_ref() {
                Value::Null => Kind::Null,
                Value::Bool(_) => Kind::Bool,
                Value::Number(_) => Kind::Number,
                Value::String(_) => Kind::String,
                Value::Array(_) => Kind::Array,
                Value::Object(_) => Kind::Object,
            },
        }
    }

    /// The object's entries, opened for editing (one level parsed the first time).
    pub fn as_object_mut(&mut self) -> Option<&mut Object<'a>> {
        if self.kind() != Kind::Object {
            return None;
        }
        if !matches!(self, Node::Object(_)) {
            let mut opened = self.entries()?.into_owned();
            if let Node::Raw(raw) = self {
                opened.source = Some((*raw, Box::new(opened.clone())));
            }
            *self = Node::Object(opened);
        }
        match self {
            Node::Object(o) => Some(o),
            _ => None,
        }
    }

    /// The array's elements, opened for editing (one level parsed the first time).
    pub fn as_array_mut(&mut self) -> Option<&mut Vec<Node<'a>>> {
        if self.kind() != Kind::Array {
            return None;
        }
        if !matches!(self, Node::Array(_)) {
            let items = self.elements()?.into_owned();
            let source = if let Node::Raw(raw) = self { Some((*raw, items.clone())) } else { None };
            *self = Node::Array(Array { items, source });
        }
        match self {
            Node::Array(a) => Some(&mut a.items),
            _ => None,
        }
    }

    /// The object's entries without editing: borrowed when opened, else parsed one level.
    pub fn entries(&self) -> Option<Cow<'_, Object<'a>>> {
        Some(match self {
            Node::Object(o) => Cow::Borrowed(o),
            Node::Raw(raw) => Cow::Owned(parse_object(*raw)?),
            Node::Value(Cow::Borrowed(Value::Object(map))) => {
                let entries = map.iter().map(|(k, v)| (Cow::Borrowed(k.as_str()), Node::Value(Cow::Borrowed(v))));
                Cow::Owned(Object { entries: entries.collect(), source: None })
            }
            Node::Value(Cow::Owned(Value::Object(map))) => {
                let entries = map.iter().map(|(k, v)| (Cow::Owned(k.clone()), Node::Value(Cow::Owned(v.clone()))));
                Cow::Owned(Object { entries: entries.collect(), source: None })
            }
            _ => return None,
        })
    }

    /// The array's elements without editing: borrowed when opened, else parsed one level.
    pub fn elements(&self) -> Option<Cow<'_, [Node<'a>]>> {
        Some(match self {
            Node::Array(a) => Cow::Borrowed(a.items.as_slice()),
            Node::Raw(raw) => {
                let mut list = Vec::new();
                split::array(*raw, |v| list.push(Node::Raw(v)))?;
                Cow::Owned(list)
            }
            Node::Value(Cow::Borrowed(Value::Array(list))) => {
                Cow::Owned(list.iter().map(|v| Node::Value(Cow::Borrowed(v))).collect())
            }
            Node::Value(Cow::Owned(Value::Array(list))) => {
                Cow::Owned(list.iter().map(|v| Node::Value(Cow::Owned(v.clone()))).collect())
            }
            _ => return None,
        })
    }

    /// [`Node::entries`], taken from `other`'s source when `self` is the raw text `other` was
    /// opened from: the diff and comparisons of a pod before and after never split twice.
    pub fn entries_beside<'n>(&'n self, other: &'n Node<'a>) -> Option<Cow<'n, Object<'a>>> {
        if let (Node::Raw(raw), Node::Object(Object { source: Some((from, original)), .. })) = (self, other) {
            if raw.same(from) {
                return Some(Cow::Borrowed(original));
            }
        }
        self.entries()
    }

    /// [`Node::elements`], the same way as [`Node::entries_beside`].
    pub fn elements_beside<'n>(&'n self, other: &'n Node<'a>) -> Option<Cow<'n, [Node<'a>]>> {
        if let (Node::Raw(raw), Node::Array(Array { source: Some((from, original)), .. })) = (self, other) {
            if raw.same(from) {
                return Some(Cow::Borrowed(original.as_slice()));
            }
        }
        self.elements()
    }

    /// An empty array.
    pub fn empty_array() -> Self {
        Node::Array(Array::default())
    }

    /// `self[key]` of an object, without opening it.
    pub fn field(&self, key: &str) -> Option<Cow<'_, Node<'a>>> {
        match self {
            Node::Object(o) => o.get(key).map(Cow::Borrowed),
            Node::Raw(raw) => find_field(*raw, key).map(|v| Cow::Owned(Node::Raw(v))),
            Node::Value(Cow::Borrowed(v)) => v.get(key).map(|v| Cow::Owned(Node::Value(Cow::Borrowed(v)))),
            Node::Value(Cow::Owned(v)) => v.get(key).map(|v| Cow::Owned(Node::Value(Cow::Owned(v.clone())))),
            Node::Array(_) => None,
        }
    }

    /// The string, if this is one (borrowed unless it has escapes).
    pub fn as_str(&self) -> Option<Cow<'_, str>> {
        match self {
            Node::Raw(raw) if self.kind() == Kind::String => split::string(raw.text),
            Node::Value(v) => v.as_str().map(Cow::Borrowed),
            _ => None,
        }
    }

    /// `self[key]` as a string, owned.
    pub fn str_field(&self, key: &str) -> Option<String> {
        self.field(key)?.as_str().map(Cow::into_owned)
    }

    /// The whole value as a `serde_json::Value` (tools, tests, and small scalars).
    ///
    /// # Panics
    ///
    /// On a part serde_json cannot read as a `Value`, which [`check`] keeps out of requests
    /// (see [`Node::try_to_value`]): never a silent `null`.
    pub fn to_value(&self) -> Value {
        self.try_to_value().unwrap_or_else(|e| panic!("a document part does not read as a JSON value: {e}"))
    }

    /// The whole value as a `serde_json::Value`, or why serde_json refuses a raw part (a number
    /// out of range, nesting deeper than its limit, a lone surrogate: what [`check`] refuses).
    pub fn try_to_value(&self) -> Result<Value, serde_json::Error> {
        Ok(match self {
            Node::Raw(raw) => serde_json::from_str(raw.text)?,
            Node::Object(o) => Value::Object(
                o.iter()
                    .map(|(k, v)| Ok((k.to_owned(), v.try_to_value()?)))
                    .collect::<Result<_, serde_json::Error>>()?,
            ),
            Node::Array(a) => Value::Array(a.items.iter().map(Node::try_to_value).collect::<Result<_, _>>()?),
            Node::Value(v) => v.as_ref().clone(),
        })
    }

    /// JSON equality as `serde_json::Value` has it: whitespace, escapes and key order do not
    /// count, duplicate keys count as their last value, but numbers compare by kind and value,
    /// so `1.0` and `1` are **not** equal (nor are `-0` and `0`). A template's `1` replacing a
    /// pod's `1.0` is then a change, which the patch writes: the pod after the patch is exactly
    /// the merge.
    pub fn equals(&self, other: &Node<'_>) -> bool {
        if let (Node::Raw(a), Node::Raw(b)) = (self, other) {
            if a.text == b.text {
                return true;
            }
        }
        match (self.kind(), other.kind()) {
            (Kind::Object, Kind::Object) => {
                let (Some(a), Some(b)) = (self.entries_beside(other), other.entries_beside(self)) else { return false };
                if a.len() != b.len() {
                    return false;
                }
                let index = b.index();
                let equal = a.iter().all(|(k, v)| index.get(k).is_some_and(|w| v.equals(w)));
                equal
            }
            (Kind::Array, Kind::Array) => {
                let (Some(a), Some(b)) = (self.elements_beside(other), other.elements_beside(self)) else {
                    return false;
                };
                a.len() == b.len() && a.iter().zip(b.iter()).all(|(x, y)| x.equals(y))
            }
            (x, y) if x != y => false,
            _ => match (self.try_to_value(), other.try_to_value()) {
                (Ok(a), Ok(b)) => a == b,
                _ => false,
            },
        }
    }
}

impl PartialEq<Value> for Node<'_> {
    fn eq(&self, other: &Value) -> bool {
        self.equals(&Node::Value(Cow::Borrowed(other)))
    }
}

impl Node<'_> {
    /// Appends the value as JSON (raw parts verbatim).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        match self {
            Node::Raw(raw) => out.extend_from_slice(raw.text.as_bytes()),
            Node::Object(o) => {
                out.push(b'{');
                for (i, (k, v)) in o.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    serde_json::to_writer(&mut *out, k).expect("writing to a Vec cannot fail");
                    out.push(b':');
                    v.write_json(out);
                }
                out.push(b'}');
            }
            Node::Array(a) => {
                out.push(b'[');
                for (i, v) in a.items.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    v.write_json(out);
                }
                out.push(b']');
            }
            Node::Value(v) => serde_json::to_writer(out, v.as_ref()).expect("writing to a Vec cannot fail"),
        }
    }
}

fn parse_object(raw: Raw<'_>) -> Option<Object<'_>> {
    let mut object = Object::default();
    split::object(raw, |key, value| object.entries.push((key, Node::Raw(value))))?;
    object.dedup_keep_last();
    Some(object)
}

fn find_field<'a>(raw: Raw<'a>, key: &str) -> Option<Raw<'a>> {
    let mut found = None;
    split::object(raw, |k, v| {
        if k == key {
            found = Some(v); // the last of duplicates wins
        }
    })?;
    found
}

/// Splitting one level of a [`Document`]'s text, which serde_json has already checked: keys
/// and values are found by a byte scan over the level itself, nested objects and arrays are
/// skipped through the document's bracket pairs. Anything unexpected gives `None`, never a panic.
mod split {
    use std::borrow::Cow;

    use super::Raw;

    /// Calls `each` with every key (unescaped) and value of the object `raw`.
    pub fn object<'a>(raw: Raw<'a>, mut each: impl FnMut(Cow<'a, str>, Raw<'a>)) -> Option<()> {
        let b = raw.text.as_bytes();
        items(b, b'{', b'}', |i| {
            let key_end = string_end(b, i)?;
            let key = string(raw.text.get(i..key_end)?)?;
            let start = skip_ws(b, expect(b, skip_ws(b, key_end), b':')?);
            let end = value_end(raw, start)?;
            each(key, raw.sub(start..end)?);
            Some(end)
        })
    }

    /// Calls `each` with every element of the array `raw`.
    pub fn array<'a>(raw: Raw<'a>, mut each: impl FnMut(Raw<'a>)) -> Option<()> {
        items(raw.text.as_bytes(), b'[', b']', |i| {
            let end = value_end(raw, i)?;
            each(raw.sub(i..end)?);
            Some(end)
        })
    }

    /// Walks the comma-separated items between `open` and `close`: `item` reads the one that
    /// starts at the index it is given and returns the index after it.
    fn items(b: &[u8], open: u8, close: u8, mut item: impl FnMut(usize) -> Option<usize>) -> Option<()> {
        let mut i = skip_ws(b, expect(b, 0, open)?);
        if b.get(i) == Some(&close) {
            return Some(());
        }
        loop {
            i = skip_ws(b, item(i)?);
            match *b.get(i)? {
                b',' => i = skip_ws(b, i + 1),
                c if c == close => return Some(()),
                _ => return None,
            }
        }
    }

    /// The contents of the string literal `text` (quotes included), borrowed unless escaped.
    pub fn string(text: &str) -> Option<Cow<'_, str>> {
        let inner = text.strip_prefix('"')?.strip_suffix('"')?;
        if inner.as_bytes().contains(&b'\\') {
            serde_json::from_str::<String>(text).ok().map(Cow::Owned)
        } else {
            Some(Cow::Borrowed(inner))
        }
    }

    fn expect(b: &[u8], i: usize, byte: u8) -> Option<usize> {
        (b.get(i) == Some(&byte)).then_some(i + 1)
    }

    fn skip_ws(b: &[u8], mut i: usize) -> usize {
        while matches!(b.get(i), Some(b' ' | b'\n' | b'\r' | b'\t')) {
            i += 1;
        }
        i
    }

    /// The index after the closing quote of the string starting at `i`.
    pub(super) fn string_end(b: &[u8], i: usize) -> Option<usize> {
        let mut j = expect(b, i, b'"')?;
        loop {
            j += quote_or_backslash(b.get(j..)?)?;
            if b[j] == b'"' {
                return Some(j + 1);
            }
            j += 2; // an escape: the next byte cannot end the string
        }
    }

    /// Like [`string_end`] (the end of the text when the string is not closed), and whether a
    /// `\\u` escape occurs in it: found while skipping, so the check costs no second pass.
    pub(super) fn string_end_noting_u_escapes(b: &[u8], i: usize) -> (usize, bool) {
        let (mut j, mut u_escape) = (i + 1, false);
        while let Some(k) = b.get(j..).and_then(quote_or_backslash) {
            j += k;
            if b[j] == b'"' {
                return (j + 1, u_escape);
            }
            u_escape |= b.get(j + 1) == Some(&b'u');
            j += 2; // an escape: the next byte cannot end the string
        }
        (b.len(), u_escape)
    }

    /// The index of the first `"` or `\\` in `b`. Eight bytes at a time: pod strings are
    /// mostly too short for memchr's SIMD set-up to pay off.
    fn quote_or_backslash(b: &[u8]) -> Option<usize> {
        const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
        const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
        let has_byte = |word: u64, byte: u8| {
            let x = word ^ (ONES * u64::from(byte));
            x.wrapping_sub(ONES) & !x & HIGHS
        };
        let mut chunks = b.chunks_exact(8);
        for (n, chunk) in chunks.by_ref().enumerate() {
            let word = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            let found = has_byte(word, b'"') | has_byte(word, b'\\');
            if found != 0 {
                // The lowest flagged byte is a real match (borrows only propagate upwards).
                return Some(n * 8 + found.trailing_zeros() as usize / 8);
            }
        }
        let tail = chunks.remainder();
        tail.iter().position(|&c| c == b'"' || c == b'\\').map(|at| b.len() - tail.len() + at)
    }

    /// The index after the value starting at `i`.
    fn value_end(raw: Raw<'_>, i: usize) -> Option<usize> {
        let b = raw.text.as_bytes();
        match b.get(i)? {
            b'"' => string_end(b, i),
            b'{' | b'[' => raw.bracket_end(i),
            _ => {
                let mut j = i;
                while j < b.len() && !matches!(b[j], b',' | b'}' | b']' | b' ' | b'\n' | b'\r' | b'\t') {
                    j += 1;
                }
                Some(j)
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::super::Node;
        use super::*;

        #[test]
        fn splits_one_level_with_escapes_and_whitespace() {
            let text = r#"{ "a\"b" : {"x": "}]\\", "y": [1, {"z": "["}]} , "c": -1.5e3,"d":[ ], "e":"\u00e9"}"#;
            let doc = super::super::Document::over(text);
            let Node::Raw(root) = doc.root() else { unreachable!() };
            let mut seen = Vec::new();
            object(root, |k, v| seen.push((k.into_owned(), v.text()))).unwrap();
            assert_eq!(
                seen,
                [
                    ("a\"b".to_owned(), r#"{"x": "}]\\", "y": [1, {"z": "["}]}"#),
                    ("c".to_owned(), "-1.5e3"),
                    ("d".to_owned(), "[ ]"),
                    ("e".to_owned(), r#""\u00e9""#)
                ]
            );
            assert_eq!(string(r#""\u00e9""#).unwrap(), "é");
            for n in 0..40 {
                let long = format!("\"{}\\\"{}\" ", "x".repeat(n), "y".repeat(n % 9));
                assert_eq!(string_end(long.as_bytes(), 0), Some(long.len() - 1), "{long}");
            }
            let doc = super::super::Document::over("[ true ,null,\"s\", [[]] ]");
            let Node::Raw(root) = doc.root() else { unreachable!() };
            let mut items = Vec::new();
            array(root, |v| items.push(v.text())).unwrap();
            assert_eq!(items, ["true", "null", "\"s\"", "[[]]"]);
        }

        #[test]
        fn unexpected_text_gives_none_not_a_panic() {
            for bad in
                ["", "{", "{\"a\"", "{\"a\":", "{\"a\":1", "[1,", "[\"\\", "{\"a\" 1}", "{1:2}", "]", "{\"a\":[}", "}{"]
            {
                let doc = super::super::Document::over(bad);
                let Node::Raw(root) = doc.root() else { unreachable!() };
                assert!(object(root, |_, _| {}).is_none(), "{bad}");
                assert!(array(root, |_| {}).is_none(), "{bad}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_owned()).unwrap()
    }

    #[test]
    fn untouched_parts_stay_the_same_bytes() {
        let text = r#"{"a": {"x": [1, 2]}, "b": "s\"q", "c": 1.5}"#;
        let r = raw(text);
        let document = Document::new(&r);
        let mut doc = document.root();
        let root = doc.as_object_mut().unwrap();
        assert!(matches!(root.get("a"), Some(Node::Raw(v)) if v.text() == r#"{"x": [1, 2]}"#));
        assert_eq!(root.get("b").unwrap().as_str().unwrap(), "s\"q");
        let mut out = Vec::new();
        doc.write_json(&mut out);
        assert_eq!(String::from_utf8(out).unwrap(), r#"{"a":{"x": [1, 2]},"b":"s\"q","c":1.5}"#);
        assert_eq!(doc.to_value(), serde_json::from_str::<Value>(text).unwrap());
    }

    #[test]
    fn duplicate_keys_keep_the_last_like_serde_json() {
        let r = raw(r#"{"a": 1, "b": 2, "a": {"z": 3}}"#);
        let document = Document::new(&r);
        let mut doc = document.root();
        assert_eq!(doc.field("a").unwrap().to_value(), json!({"z": 3}));
        let root = doc.as_object_mut().unwrap();
        assert_eq!(root.len(), 2);
        assert_eq!(doc.to_value(), json!({"a": {"z": 3}, "b": 2}));
    }

    #[test]
    fn equality_is_json_equality() {
        let (a, b) = (raw(r#"{"k": [1, {"x": "y"}], "n": 1}"#), raw(r#"{"n":1,"k":[1,{"x":"y"}]}"#));
        assert!(Document::new(&a).root().equals(&Document::new(&b).root()));
        let v = json!({"n": 1, "k": [1, {"x": "y"}]});
        assert!(Document::new(&a).root() == v);
        assert!(Document::new(&a).root() != json!({"n": 2, "k": [1, {"x": "y"}]}));
        let document = Document::new(&a);
        let mut opened = document.root();
        opened.as_object_mut().unwrap().get_mut("k").unwrap().as_array_mut().unwrap();
        assert!(opened.equals(&Document::new(&b).root()));
    }

    #[test]
    fn numbers_compare_as_serde_json_values_do() {
        let (int, float, neg_zero) = (raw("1"), raw("1.0"), raw("-0"));
        let (int, float, neg_zero) = (Document::new(&int), Document::new(&float), Document::new(&neg_zero));
        assert!(!int.root().equals(&float.root()), "1 and 1.0 differ, as in serde_json");
        assert_ne!(json!(1), serde_json::from_str::<Value>("1.0").unwrap());
        assert!(float.root() == serde_json::from_str::<Value>("1.0").unwrap());
        assert!(int.root() == json!(1) && float.root() != json!(1));
        assert!(neg_zero.root() != json!(0));
        let (big, exp) = (raw("18446744073709551616"), raw("1.8446744073709552e19"));
        assert!(Document::new(&big).root().equals(&Document::new(&exp).root()), "both read as the same f64");
    }

    #[test]
    fn an_objects_pairs_from_the_body_are_those_of_its_own_scan() {
        let object = r#"{"metadata": {"name": "p", "labels": {"a": "[{"}}, "spec": {"containers": [{"name": "c", "args": ["}", "\"]"]}]}}"#;
        let bodies = [
            format!(r#"{{"request": {{"uid": "u", "object": {object}}}}}"#),
            // The same text twice (an update's oldObject): either occurrence has the same pairs.
            format!(r#"{{"request": {{"oldObject": {object}, "object": {object}, "x": [[1], {{}}]}}}}"#),
        ];
        for body in &bodies {
            let pairs = check_and_pair(body.as_bytes()).unwrap();
            let raw = serde_json::from_str::<Box<RawValue>>(object).unwrap();
            let within = pairs_within(raw.get(), body.as_bytes(), &pairs).expect("found in the body");
            assert_eq!(within, bracket_pairs(object.as_bytes()).unwrap(), "{body}");
            let document = Document::with_pairs(&raw, within);
            assert_eq!(document.root().to_value(), serde_json::from_str::<Value>(object).unwrap());
        }
        assert_eq!(
            pairs_within(r#"{"not": "there"}"#, bodies[0].as_bytes(), &check_and_pair(bodies[0].as_bytes()).unwrap()),
            None
        );
    }

    #[test]
    fn check_refuses_what_a_value_parse_would() {
        let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert_eq!(check(nested(MAX_DEPTH).as_bytes()), Ok(()));
        assert_eq!(check(nested(MAX_DEPTH + 1).as_bytes()), Err(Unreadable::TooDeep));
        assert_eq!(check(format!("{{\"a\":{}}}", nested(5000)).as_bytes()), Err(Unreadable::TooDeep));
        // Brackets inside strings do not count.
        assert_eq!(check(format!("[\"{}\"]", "[".repeat(500)).as_bytes()), Ok(()));
        for ok in [
            "-1.5e3",
            "1e-400",
            "18446744073709551616",
            "-9223372036854775809",
            "[0.1,2]",
            "\"\\ud83d\\ude00\"",
            "\"\\\\u\"",
        ] {
            assert_eq!(check(ok.as_bytes()), Ok(()), "{ok}");
            assert!(serde_json::from_str::<Value>(ok).is_ok(), "{ok}");
        }
        let long = "9".repeat(400);
        for (bad, err) in [
            ("[1e400]", Unreadable::Number(1)),
            ("-1E+309", Unreadable::Number(0)),
            (long.as_str(), Unreadable::Number(0)),
            ("{\"k\":\"\\ud800\"}", Unreadable::Escape(5)),
            ("[\"\\udc00x\"]", Unreadable::Escape(1)),
        ] {
            assert_eq!(check(bad.as_bytes()), Err(err), "{bad}");
            assert!(serde_json::from_str::<Value>(bad).is_err(), "{bad}");
            assert!(serde_json::from_str::<Box<RawValue>>(bad).is_ok(), "a RawValue lets {bad} through");
        }
    }

    #[test]
    fn to_value_never_turns_an_error_into_null() {
        let r = raw("[1e400]");
        let document = Document::new(&r);
        assert!(document.root().try_to_value().is_err());
        let err = std::panic::catch_unwind(|| Document::new(&r).root().to_value()).unwrap_err();
        assert!(err.downcast_ref::<String>().unwrap().contains("number out of range"));
    }

    #[test]
    fn kinds_and_views_of_template_values() {
        let v = json!({"list": [1, "two"], "obj": {"k": null}});
        let node = Node::Value(Cow::Borrowed(&v));
        assert_eq!(node.kind(), Kind::Object);
        assert_eq!(node.field("list").unwrap().elements().unwrap().len(), 2);
        assert_eq!(node.field("obj").unwrap().field("k").unwrap().kind(), Kind::Null);
    }

    #[test]
    fn objects_with_many_keys_compare_through_a_set() {
        let keys: serde_json::Map<String, Value> = (0..1000).map(|i| (format!("k{i}"), json!(i))).collect();
        let mut reversed: Vec<_> = keys.iter().collect();
        reversed.reverse();
        let text =
            format!("{{{}}}", reversed.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect::<Vec<_>>().join(","));
        let r = raw(&text);
        assert!(Document::new(&r).root() == Value::Object(keys));
        let document = Document::new(&r);
        let root = document.root();
        let o = root.entries().unwrap();
        assert!(matches!(o.index(), Index::Hashed(_)));
        assert!(o.index().contains_key("k999") && !o.index().contains_key("k1000"));
    }
}
