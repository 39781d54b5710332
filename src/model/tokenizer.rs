//! Tokenizer: text ⇄ token ids, built from GGUF metadata (GPT-2 byte-level BPE with merges, or a SentencePiece
//! llama vocab with scores) or from an HF tokenizer.json. Encoding is done by the `tokenizers` crate's BPE;
//! decoding is our own byte table so that streamed text can be cut at UTF-8 boundaries (see `engine::detok`).

use super::ModelError;
use std::collections::HashMap;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Prepend, Replace};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

/// Llama 3 / Qwen2 style: case-insensitive contractions, numbers in groups (llama3: up to 3 digits).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Token kinds as GGUF `tokenizer.ggml.token_type` numbers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenKind {
    fn from_gguf(v: i32) -> TokenKind {
        match v {
            2 => TokenKind::Unknown,
            3 => TokenKind::Control,
            4 => TokenKind::UserDefined,
            5 => TokenKind::Unused,
            6 => TokenKind::Byte,
            _ => TokenKind::Normal,
        }
    }
}

/// What the model's vocabulary was trained as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VocabStyle {
    /// GPT-2 byte-level BPE: every byte is a printable stand-in character.
    ByteLevel,
    /// SentencePiece: `▁` is a space, `<0xNN>` tokens are raw bytes.
    SentencePiece,
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Decoded bytes of every token (control tokens: their text).
    bytes: Vec<Vec<u8>>,
    kinds: Vec<TokenKind>,
    pub bos: Option<u32>,
    /// Tokens that end generation (EOS, end-of-turn).
    pub eos: Vec<u32>,
    pub add_bos: bool,
    pub chat_template: Option<String>,
}

/// GPT-2's byte → printable-char table.
fn byte_to_char() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable =
            (b'!' as u32..=b'~' as u32).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).unwrap_or('?')
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('?')
        };
    }
    table
}

fn token_bytes(text: &str, kind: TokenKind, style: VocabStyle, inverse: &HashMap<char, u8>) -> Vec<u8> {
    if matches!(
        kind,
        TokenKind::Control | TokenKind::UserDefined | TokenKind::Unknown | TokenKind::Unused
    ) {
        return text.as_bytes().to_vec();
    }
    match style {
        VocabStyle::ByteLevel => text.chars().map(|c| inverse.get(&c).copied().unwrap_or(b'?')).collect(),
        VocabStyle::SentencePiece => {
            if kind == TokenKind::Byte || (text.len() == 6 && text.starts_with("<0x") && text.ends_with('>')) {
                // `get`: a byte-type token may be shorter than `<0xNN>` or not ASCII in a hostile vocabulary
                if let Some(b) = text
                    .strip_prefix("<0x")
                    .and_then(|h| h.get(..2))
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    return vec![b];
                }
            }
            text.replace('\u{2581}', " ").into_bytes()
        }
    }
}

/// More token ids than any released vocabulary (Gemma's 262k) by far; larger ids are a corrupt file.
const MAX_VOCAB: usize = 1 << 22;

fn tok_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

/// Inputs for building a tokenizer from a GGUF file's metadata.
pub struct GgufVocab<'a> {
    pub model: &'a str,
    pub pre: Option<&'a str>,
    pub tokens: Vec<String>,
    pub kinds: Vec<TokenKind>,
    pub scores: Option<Vec<f32>>,
    pub merges: Option<Vec<String>>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub eot: Option<u32>,
    pub add_bos: Option<bool>,
    pub add_space_prefix: Option<bool>,
    pub chat_template: Option<String>,
}

impl GgufVocab<'_> {
    pub fn raw_kinds(types: &[i32]) -> Vec<TokenKind> {
        types.iter().map(|&t| TokenKind::from_gguf(t)).collect()
    }
}

impl Tokenizer {
    pub fn from_gguf(v: GgufVocab<'_>) -> Result<Tokenizer, ModelError> {
        let n = v.tokens.len();
        let mut kinds = v.kinds.clone();
        kinds.resize(n, TokenKind::Normal);
        let vocab: HashMap<String, u32> = v
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let (style, mut tk) = match v.model {
            "gpt2" => {
                let merges = v
                    .merges
                    .as_ref()
                    .ok_or_else(|| tok_err("gpt2 vocab without tokenizer.ggml.merges"))?;
                let merges: Vec<(String, String)> = merges
                    .iter()
                    .map(|m| {
                        m.split_once(' ')
                            .map(|(a, b)| (a.to_string(), b.to_string()))
                            .ok_or_else(|| tok_err(format!("bad merge `{m}`")))
                    })
                    .collect::<Result<_, _>>()?;
                let bpe = BPE::builder()
                    .vocab_and_merges(bpe_vocab(&vocab), merges)
                    .build()
                    .map_err(tok_err)?;
                let mut tk = tokenizers::Tokenizer::new(bpe);
                let regex = match v.pre.unwrap_or("default") {
                    "llama3" | "llama-bpe" | "llama-v3" | "smaug-bpe" => Some(LLAMA3_REGEX),
                    "qwen2" | "deepseek-r1-qwen" => Some(QWEN2_REGEX),
                    _ => None,
                };
                let digits_first = matches!(
                    v.pre,
                    Some("smollm" | "starcoder" | "refact" | "codeshell" | "exaone" | "minerva-7b")
                );
                let pre: PreTokenizerWrapper = match regex {
                    Some(r) => Sequence::new(vec![
                        Split::new(SplitPattern::Regex(r.into()), SplitDelimiterBehavior::Isolated, false)
                            .map_err(tok_err)?
                            .into(),
                        ByteLevel::new(false, false, false).into(),
                    ])
                    .into(),
                    None if digits_first => Sequence::new(vec![
                        Digits::new(true).into(),
                        ByteLevel::new(false, false, true).into(),
                    ])
                    .into(),
                    None => ByteLevel::new(false, false, true).into(),
                };
                tk.with_pre_tokenizer(Some(pre));
                (VocabStyle::ByteLevel, tk)
            }
            "llama" => {
                let scores = v
                    .scores
                    .clone()
                    .unwrap_or_else(|| (0..n).map(|i| -(i as f32)).collect());
                let merges = spm_merges(&v.tokens, &scores, &vocab);
                let unk = kinds
                    .iter()
                    .position(|k| *k == TokenKind::Unknown)
                    .map(|i| v.tokens[i].clone());
                let mut b = BPE::builder()
                    .vocab_and_merges(bpe_vocab(&vocab), merges)
                    .byte_fallback(true);
                if let Some(u) = unk {
                    b = b.unk_token(u);
                }
                let mut tk = tokenizers::Tokenizer::new(b.build().map_err(tok_err)?);
                let mut norms: Vec<NormalizerWrapper> = Vec::new();
                if v.add_space_prefix.unwrap_or(true) {
                    norms.push(Prepend::new("\u{2581}".into()).into());
                }
                norms.push(Replace::new(" ", "\u{2581}").map_err(tok_err)?.into());
                tk.with_normalizer(Some(tokenizers::normalizers::Sequence::new(norms)))
                    .map_err(tok_err)?;
                (VocabStyle::SentencePiece, tk)
            }
            other => {
                return Err(tok_err(format!(
                    "unsupported tokenizer model `{other}` (supported: gpt2, llama)"
                )))
            }
        };
        let specials: Vec<AddedToken> = kinds
            .iter()
            .enumerate()
            .filter(|(_, k)| matches!(k, TokenKind::Control | TokenKind::UserDefined))
            .map(|(i, _)| AddedToken::from(v.tokens[i].clone(), true))
            .collect();
        tk.add_special_tokens(specials).map_err(tok_err)?;
        let b2c = byte_to_char();
        let inverse: HashMap<char, u8> = b2c.iter().enumerate().map(|(b, &c)| (c, b as u8)).collect();
        let bytes = v
            .tokens
            .iter()
            .zip(&kinds)
            .map(|(t, &k)| token_bytes(t, k, style, &inverse))
            .collect();
        let mut eos: Vec<u32> = v.eos.into_iter().chain(v.eot).collect();
        for name in ["<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "</s>"] {
            if let Some(&id) = vocab.get(name) {
                if kinds[id as usize] == TokenKind::Control && !eos.contains(&id) && Some(id) != v.bos {
                    eos.push(id);
                }
            }
        }
        Ok(Tokenizer {
            inner: tk,
            bytes,
            kinds,
            bos: v.bos,
            eos,
            add_bos: v.add_bos.unwrap_or(style == VocabStyle::SentencePiece),
            chat_template: v.chat_template,
        })
    }

    /// From an HF `tokenizer.json` (+ `tokenizer_config.json` for BOS/EOS and the chat template).
    pub fn from_hf_files(tokenizer_json: &[u8], config_json: Option<&str>) -> Result<Tokenizer, ModelError> {
        // `tokenizers` panics on some malformed files (0.23: a decoder entry of the wrong shape hits an
        // `expect`, found by fuzzing); a model file is input, so that is an error here like any other.
        let parsed = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(tokenizer_json)).map_err(|p| {
            tok_err(format!(
                "malformed tokenizer.json (the tokenizers library panicked: {})",
                super::panic_text(p.as_ref())
            ))
        })?;
        let inner = parsed.map_err(tok_err)?;
        // Per-token tables are indexed by id, and ids may have holes: size them by the largest id, which a
        // hostile file must not make arbitrarily large.
        let vocab = inner.get_vocab(true);
        let top = vocab.values().map(|&id| id as usize + 1).max().unwrap_or(0);
        let n = inner.get_vocab_size(true).max(top);
        if n > MAX_VOCAB {
            let (t, id) = vocab.iter().max_by_key(|(_, &id)| id).expect("n > 0");
            return Err(tok_err(format!(
                "token {t:?} has id {id}, beyond the vocabulary ({MAX_VOCAB} tokens at most)"
            )));
        }
        let added = inner.get_added_tokens_decoder();
        let byte_level = matches!(inner.get_decoder(), Some(tokenizers::DecoderWrapper::ByteLevel(_)));
        let style = if byte_level {
            VocabStyle::ByteLevel
        } else {
            VocabStyle::SentencePiece
        };
        let b2c = byte_to_char();
        let inverse: HashMap<char, u8> = b2c.iter().enumerate().map(|(b, &c)| (c, b as u8)).collect();
        let mut kinds = vec![TokenKind::Normal; n];
        let mut bytes = vec![Vec::new(); n];
        for id in 0..n as u32 {
            let kind = match added.get(&id) {
                Some(t) if t.special => TokenKind::Control,
                Some(_) => TokenKind::UserDefined,
                None => TokenKind::Normal,
            };
            kinds[id as usize] = kind;
            let text = inner.id_to_token(id).unwrap_or_default();
            bytes[id as usize] = token_bytes(&text, kind, style, &inverse);
        }
        let cfg: serde_json::Value = config_json
            .and_then(|c| serde_json::from_str(c).ok())
            .unwrap_or_default();
        let tok_text = |v: &serde_json::Value| -> Option<String> {
            v.as_str()
                .map(str::to_string)
                .or_else(|| v["content"].as_str().map(str::to_string))
        };
        let bos = tok_text(&cfg["bos_token"]).and_then(|t| inner.token_to_id(&t));
        let mut eos: Vec<u32> = tok_text(&cfg["eos_token"])
            .and_then(|t| inner.token_to_id(&t))
            .into_iter()
            .collect();
        for name in ["<|im_end|>", "<|eot_id|>", "<|endoftext|>"] {
            if let Some(id) = inner.token_to_id(name) {
                if kinds[id as usize] == TokenKind::Control && !eos.contains(&id) && Some(id) != bos {
                    eos.push(id);
                }
            }
        }
        Ok(Tokenizer {
            inner,
            bytes,
            kinds,
            bos,
            eos,
            add_bos: cfg["add_bos_token"].as_bool().unwrap_or(false),
            chat_template: cfg["chat_template"].as_str().map(str::to_string),
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.bytes.len()
    }

    /// Encode text; special tokens written in the text (`<|im_start|>`) are recognised. A BOS is prepended when
    /// the model asks for one and `add_bos` is set.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, ModelError> {
        let enc = self.inner.encode_fast(text, false).map_err(tok_err)?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_bos && self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Raw bytes of one token; control tokens give their text only when `special` is set.
    pub fn token_bytes(&self, id: u32, special: bool) -> &[u8] {
        match self.kinds.get(id as usize) {
            None => &[],
            Some(TokenKind::Control) if !special => &[],
            Some(_) => &self.bytes[id as usize],
        }
    }

    pub fn token_kind(&self, id: u32) -> Option<TokenKind> {
        self.kinds.get(id as usize).copied()
    }

    /// Decode a whole sequence (lossy at invalid UTF-8).
    pub fn decode(&self, ids: &[u32], special: bool) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&i| self.token_bytes(i, special).iter().copied())
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    pub fn token_text(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a token written exactly as `text` (`<think>`), if the vocabulary has one.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.inner.token_to_id(text)
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.eos.contains(&id)
    }
}

fn bpe_vocab(v: &HashMap<String, u32>) -> tokenizers::models::bpe::Vocab {
    v.iter().map(|(k, id)| (k.clone(), *id)).collect()
}

/// Merges for a SentencePiece vocab: every way of writing a piece as two vocab pieces, ranked by the merged
/// piece's score (higher first) — the conversion HF's `SentencePieceExtractor` performs.
fn spm_merges(tokens: &[String], scores: &[f32], vocab: &HashMap<String, u32>) -> Vec<(String, String)> {
    let mut merges: Vec<(f32, u32, u32, String, String)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        let chars: Vec<(usize, char)> = piece.char_indices().collect();
        for &(i, _) in chars.iter().skip(1) {
            let (l, r) = piece.split_at(i);
            if let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r)) {
                merges.push((
                    scores.get(id).copied().unwrap_or(0.0),
                    li,
                    ri,
                    l.to_string(),
                    r.to_string(),
                ));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    merges.into_iter().map(|m| (m.3, m.4)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_a_bijection() {
        let t = byte_to_char();
        let set: std::collections::HashSet<char> = t.iter().copied().collect();
        assert_eq!(set.len(), 256);
        assert_eq!(t[b' ' as usize], '\u{120}'); // 'Ġ'
        assert_eq!(t[b'\n' as usize], '\u{10A}'); // 'Ċ'
    }

    #[test]
    fn sentencepiece_vocab_encodes_with_score_merges_and_byte_fallback() {
        let toks = [
            "<unk>",
            "<s>",
            "</s>",
            "<0x0A>",
            "<0x21>",
            "\u{2581}",
            "h",
            "e",
            "l",
            "o",
            "he",
            "ll",
            "\u{2581}he",
            "hell",
            "\u{2581}hell",
            "\u{2581}hello",
            "lo",
            "llo",
        ];
        let kinds: Vec<i32> = toks
            .iter()
            .enumerate()
            .map(|(i, _)| match i {
                0 => 2,
                1 | 2 => 3,
                3 | 4 => 6,
                _ => 1,
            })
            .collect();
        let scores: Vec<f32> = (0..toks.len()).map(|i| -(i as f32)).collect();
        let tk = Tokenizer::from_gguf(GgufVocab {
            model: "llama",
            pre: None,
            tokens: toks.iter().map(|s| s.to_string()).collect(),
            kinds: GgufVocab::raw_kinds(&kinds),
            scores: Some(scores),
            merges: None,
            bos: Some(1),
            eos: Some(2),
            eot: None,
            add_bos: Some(true),
            add_space_prefix: Some(true),
            chat_template: None,
        })
        .unwrap();
        let ids = tk.encode("hello\n!", true).unwrap();
        assert_eq!(ids[0], 1, "bos first");
        assert_eq!(tk.decode(&ids, false), " hello\n!");
        assert!(
            ids.contains(&3) && ids.contains(&4),
            "newline and '!' fall back to byte tokens: {ids:?}"
        );
        assert!(tk.is_eos(2));
    }
}
