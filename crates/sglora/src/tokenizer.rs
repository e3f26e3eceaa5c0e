//! BERT WordPiece tokeniser (uncased): what the bundle's `tokenizer.json` describes, without the
//! general-purpose `tokenizers` crate.
//!
//! The encoder's tokenizer is a fixed recipe — BertNormalizer (clean text, isolate CJK
//! characters, strip accents, lowercase), BertPreTokenizer (split on whitespace, isolate
//! punctuation), greedy longest-match WordPiece, `[CLS] … [SEP]` — so it is implemented here in
//! a few hundred lines with a compact vocabulary (one sorted string table, ~0.5 MB instead of
//! ~7 MB of hash maps) and a much smaller binary. `load` refuses a `tokenizer.json` that asks for
//! anything else. The character classes come from the same crates Hugging Face `tokenizers`
//! uses (`unicode_categories`, `unicode-normalization-alignments`), and `tests/fuzz.rs` checks
//! equal ids against `tokenizers` itself on random text.

use serde::Deserialize;
use serde_json::Value;
use unicode_categories::UnicodeCategories;
use unicode_normalization_alignments::UnicodeNormalization;

/// Why a `tokenizer.json` cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TokenizerError(String);

fn bad(what: impl Into<String>) -> TokenizerError {
    TokenizerError(what.into())
}

/// A loaded WordPiece vocabulary and the special tokens.
#[derive(Debug)]
pub struct Tokenizer {
    /// All vocabulary entries concatenated, sorted by text.
    text: String,
    /// `(start, end, id)` of each entry in `text`, in the same (sorted) order.
    entries: Vec<(u32, u32, u32)>,
    /// Special tokens matched in the raw text (`[CLS]`, `[MASK]`, …), longest first.
    specials: Vec<(String, u32)>,
    unk: u32,
    cls: u32,
    sep: u32,
    prefix: String,
    max_word_chars: usize,
    max_tokens: usize,
}

#[derive(Deserialize)]
struct AddedToken {
    id: u32,
    content: String,
    #[serde(default)]
    normalized: bool,
    #[serde(default)]
    single_word: bool,
    #[serde(default)]
    lstrip: bool,
    #[serde(default)]
    rstrip: bool,
}

fn expect(v: &Value, path: &str, want: &str) -> Result<(), TokenizerError> {
    let got = v.pointer(path);
    if got.and_then(Value::as_str) != Some(want) {
        return Err(bad(format!(
            "{path} is {}, only {want:?} is supported",
            got.map_or("missing".into(), |g| g.to_string())
        )));
    }
    Ok(())
}

fn flag(v: &Value, path: &str) -> Option<bool> {
    v.pointer(path).and_then(Value::as_bool)
}

impl Tokenizer {
    /// Parse a Hugging Face `tokenizer.json` of the BERT-uncased WordPiece kind; sequences are cut
    /// to `max_tokens` tokens, `[CLS]` and `[SEP]` included.
    pub fn from_json(bytes: &[u8], max_tokens: usize) -> Result<Tokenizer, TokenizerError> {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| bad(format!("not JSON: {e}")))?;
        expect(&v, "/model/type", "WordPiece")?;
        expect(&v, "/normalizer/type", "BertNormalizer")?;
        expect(&v, "/pre_tokenizer/type", "BertPreTokenizer")?;
        expect(&v, "/post_processor/type", "TemplateProcessing")?;
        let lowercase = flag(&v, "/normalizer/lowercase");
        let strip = v.pointer("/normalizer/strip_accents").cloned();
        if flag(&v, "/normalizer/clean_text") != Some(true)
            || flag(&v, "/normalizer/handle_chinese_chars") != Some(true)
            || lowercase != Some(true)
            || !matches!(strip, None | Some(Value::Null) | Some(Value::Bool(true)))
        {
            return Err(bad(
                "the BertNormalizer must clean text, isolate CJK characters, lowercase and strip \
                 accents (the uncased BERT recipe)",
            ));
        }
        let single = v.pointer("/post_processor/single").cloned();
        let want_single = serde_json::json!([
            {"SpecialToken": {"id": "[CLS]", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": "[SEP]", "type_id": 0}}
        ]);
        if single.as_ref() != Some(&want_single) {
            return Err(bad("post_processor.single must be [CLS] $A [SEP]"));
        }
        let vocab = v
            .pointer("/model/vocab")
            .and_then(Value::as_object)
            .ok_or_else(|| bad("model.vocab is missing"))?;
        let mut pairs: Vec<(&str, u32)> = Vec::with_capacity(vocab.len());
        for (k, id) in vocab {
            let id = id
                .as_u64()
                .and_then(|i| u32::try_from(i).ok())
                .ok_or_else(|| bad(format!("vocab entry {k:?} has no valid id")))?;
            pairs.push((k, id));
        }
        pairs.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let mut text = String::with_capacity(pairs.iter().map(|p| p.0.len()).sum());
        let mut entries = Vec::with_capacity(pairs.len());
        for (k, id) in &pairs {
            let start = text.len();
            text.push_str(k);
            let end = text.len();
            let (Ok(s), Ok(e)) = (u32::try_from(start), u32::try_from(end)) else {
                return Err(bad("vocabulary too large"));
            };
            entries.push((s, e, *id));
        }
        let added: Vec<AddedToken> = match v.get("added_tokens") {
            Some(a) => {
                serde_json::from_value(a.clone()).map_err(|e| bad(format!("added_tokens: {e}")))?
            }
            None => Vec::new(),
        };
        if let Some(t) = added
            .iter()
            .find(|t| t.normalized || t.single_word || t.lstrip || t.rstrip)
        {
            return Err(bad(format!(
                "added token {:?} uses normalized/single_word/lstrip/rstrip, which is not supported",
                t.content
            )));
        }
        let mut specials: Vec<(String, u32)> =
            added.into_iter().map(|t| (t.content, t.id)).collect();
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
        specials.retain(|(s, _)| !s.is_empty());
        let str_at = |p: &str| v.pointer(p).and_then(Value::as_str).map(str::to_owned);
        let unk_token = str_at("/model/unk_token").ok_or_else(|| bad("model.unk_token missing"))?;
        let prefix = str_at("/model/continuing_subword_prefix").unwrap_or_else(|| "##".into());
        let max_word_chars = v
            .pointer("/model/max_input_chars_per_word")
            .and_then(Value::as_u64)
            .map_or(100, |n| n as usize);
        let mut tok = Tokenizer {
            text,
            entries,
            specials,
            unk: 0,
            cls: 0,
            sep: 0,
            prefix,
            max_word_chars,
            max_tokens,
        };
        let id = |t: &Tokenizer, s: &str| {
            t.lookup(s)
                .ok_or_else(|| bad(format!("{s:?} is not in the vocabulary")))
        };
        tok.unk = id(&tok, &unk_token)?;
        tok.cls = id(&tok, "[CLS]")?;
        tok.sep = id(&tok, "[SEP]")?;
        if max_tokens < 3 {
            return Err(bad(format!(
                "max_tokens {max_tokens} leaves no room for text"
            )));
        }
        Ok(tok)
    }

    /// Id of a vocabulary entry.
    fn lookup(&self, s: &str) -> Option<u32> {
        self.entries
            .binary_search_by(|&(a, b, _)| self.text[a as usize..b as usize].cmp(s))
            .ok()
            .map(|i| self.entries[i].2)
    }

    /// Number of vocabulary entries.
    pub fn vocab_size(&self) -> usize {
        self.entries.len()
    }

    /// Token ids of `text`: `[CLS]`, the text's tokens (cut to fit), `[SEP]`.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let room = self.max_tokens - 2;
        let mut ids = vec![self.cls];
        let mut rest = text;
        let mut word = String::new();
        'all: while !rest.is_empty() {
            // Special tokens are matched in the raw text, leftmost first, longest at a position.
            let hit = self
                .specials
                .iter()
                .filter_map(|(s, id)| rest.find(s.as_str()).map(|at| (at, s.len(), *id)))
                .min_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
            let (plain, special, next) = match hit {
                Some((at, len, id)) => (&rest[..at], Some(id), &rest[at + len..]),
                None => (rest, None, ""),
            };
            for w in self.words(plain, &mut word) {
                self.wordpiece(&w, &mut ids);
                if ids.len() > room {
                    break 'all;
                }
            }
            if let Some(id) = special {
                ids.push(id);
                if ids.len() > room {
                    break;
                }
            }
            rest = next;
        }
        ids.truncate(room + 1);
        ids.push(self.sep);
        ids
    }

    /// Normalise (BertNormalizer) and split (BertPreTokenizer) `text` into words.
    fn words(&self, text: &str, buf: &mut String) -> Vec<String> {
        buf.clear();
        for c in text.chars() {
            // clean_text: drop NUL, U+FFFD and control/format/unassigned characters; every
            // whitespace character becomes a space.
            if c == '\0' || c == '\u{fffd}' || (!matches!(c, '\t' | '\n' | '\r') && c.is_other()) {
                continue;
            }
            if matches!(c, '\t' | '\n' | '\r') || c.is_whitespace() {
                buf.push(' ');
                continue;
            }
            // handle_chinese_chars: CJK ideographs become words of their own.
            if is_chinese_char(c) {
                buf.push(' ');
                buf.push(c);
                buf.push(' ');
                continue;
            }
            buf.push(c);
        }
        // strip_accents (NFD, drop nonspacing marks), then lowercase.
        let normalized: String = buf
            .as_str()
            .nfd()
            .map(|(c, _)| c)
            .filter(|c| !c.is_mark_nonspacing())
            .flat_map(char::to_lowercase)
            .collect();
        let mut out = Vec::new();
        for chunk in normalized.split(char::is_whitespace) {
            let mut cur = String::new();
            for c in chunk.chars() {
                if c.is_ascii_punctuation() || c.is_punctuation() {
                    if !cur.is_empty() {
                        out.push(std::mem::take(&mut cur));
                    }
                    out.push(c.to_string());
                } else {
                    cur.push(c);
                }
            }
            if !cur.is_empty() {
                out.push(cur);
            }
        }
        out
    }

    /// Greedy longest-match-first WordPiece of one word; a word with a piece missing from the
    /// vocabulary (or longer than `max_input_chars_per_word`) becomes one `[UNK]`.
    fn wordpiece(&self, word: &str, ids: &mut Vec<u32>) {
        if word.chars().count() > self.max_word_chars {
            ids.push(self.unk);
            return;
        }
        let before = ids.len();
        let mut start = 0;
        let mut probe = String::new();
        while start < word.len() {
            let mut end = word.len();
            let mut found = None;
            while start < end {
                probe.clear();
                if start > 0 {
                    probe.push_str(&self.prefix);
                }
                probe.push_str(&word[start..end]);
                if let Some(id) = self.lookup(&probe) {
                    found = Some(id);
                    break;
                }
                end -= word[start..end].chars().last().map_or(1, char::len_utf8);
            }
            match found {
                Some(id) => ids.push(id),
                None => {
                    ids.truncate(before);
                    ids.push(self.unk);
                    return;
                }
            }
            start = end;
        }
    }
}

fn is_chinese_char(c: char) -> bool {
    matches!(
        c as usize,
        0x4E00..=0x9FFF
            | 0x3400..=0x4DBF
            | 0x20000..=0x2A6DF
            | 0x2A700..=0x2B73F
            | 0x2B740..=0x2B81F
            | 0x2B920..=0x2CEAF
            | 0xF900..=0xFAFF
            | 0x2F800..=0x2FA1F
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Tokenizer {
        let json = serde_json::json!({
            "added_tokens": [
                {"id": 0, "content": "[PAD]", "normalized": false},
                {"id": 1, "content": "[UNK]", "normalized": false},
                {"id": 2, "content": "[CLS]", "normalized": false},
                {"id": 3, "content": "[SEP]", "normalized": false},
                {"id": 4, "content": "[MASK]", "normalized": false}
            ],
            "normalizer": {"type": "BertNormalizer", "clean_text": true,
                           "handle_chinese_chars": true, "strip_accents": null, "lowercase": true},
            "pre_tokenizer": {"type": "BertPreTokenizer"},
            "post_processor": {"type": "TemplateProcessing", "single": [
                {"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": "[SEP]", "type_id": 0}}]},
            "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                      "max_input_chars_per_word": 100,
                      "vocab": {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4,
                                "find": 5, "the": 6, "word": 7, "##s": 8, "!": 9, "cafe": 10,
                                "中": 11, "un": 12, "##aff": 13, "##able": 14}}
        });
        Tokenizer::from_json(json.to_string().as_bytes(), 8).unwrap()
    }

    #[test]
    fn bert_recipe() {
        let t = tiny();
        // Lowercase, accents stripped, punctuation isolated, CJK isolated, longest match first.
        assert_eq!(t.encode("Find THE words!"), vec![2, 5, 6, 7, 8, 9, 3]);
        assert_eq!(t.encode("Café中"), vec![2, 10, 11, 3]);
        assert_eq!(t.encode("unaffable"), vec![2, 12, 13, 14, 3]);
        // A word with an unknown piece is one [UNK]; special tokens are matched in raw text.
        assert_eq!(t.encode("unaffablez [MASK]word"), vec![2, 1, 4, 7, 3]);
        // Control characters vanish, whitespace of any kind separates.
        assert_eq!(t.encode("the\u{0007}\u{200b}\tword"), vec![2, 6, 7, 3]);
        assert_eq!(t.encode(""), vec![2, 3]);
    }

    #[test]
    fn cut_to_max_tokens_with_specials() {
        let t = tiny();
        let ids = t.encode("the the the the the the the the the the");
        assert_eq!(ids.len(), 8);
        assert_eq!((ids[0], ids[7]), (2, 3));
    }

    #[test]
    fn other_recipes_are_refused() {
        let mut v: Value = serde_json::from_str(
            &serde_json::to_string(&serde_json::json!({
                "normalizer": {"type": "BertNormalizer", "clean_text": true,
                               "handle_chinese_chars": true, "strip_accents": null, "lowercase": false},
                "pre_tokenizer": {"type": "BertPreTokenizer"},
                "post_processor": {"type": "TemplateProcessing"},
                "model": {"type": "WordPiece", "vocab": {}}
            }))
            .unwrap(),
        )
        .unwrap();
        let err = Tokenizer::from_json(v.to_string().as_bytes(), 8).unwrap_err();
        assert!(err.to_string().contains("uncased"), "{err}");
        v["model"]["type"] = "BPE".into();
        let err = Tokenizer::from_json(v.to_string().as_bytes(), 8).unwrap_err();
        assert!(err.to_string().contains("WordPiece"), "{err}");
    }
}
