//! Incremental detokenisation: bytes of each new token are appended, and only the longest
//! complete UTF-8 prefix is released, so a streamed piece never splits a character.

use crate::tokenizer::Tokenizer;

#[derive(Default)]
pub struct TextStream {
    pending: Vec<u8>,
}

impl TextStream {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add one token; returns the text that became complete (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        self.push_bytes(tok.token_bytes(id))
    }

    pub fn push_bytes(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            // An invalid sequence (not just an unfinished one) is released as U+FFFD.
            Err(e) if e.error_len().is_some() => self.pending.len(),
            Err(e) => e.valid_up_to(),
        };
        let out: Vec<u8> = self.pending.drain(..valid).collect();
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Whatever is left at the end of generation.
    pub fn finish(&mut self) -> String {
        let out = std::mem::take(&mut self.pending);
        String::from_utf8_lossy(&out).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multibyte_character_split_over_tokens() {
        let mut s = TextStream::new();
        let e = "é".as_bytes();
        assert_eq!(s.push_bytes(b"caf"), "caf");
        assert_eq!(s.push_bytes(&e[..1]), "");
        assert_eq!(s.push_bytes(&e[1..]), "é");
        assert_eq!(s.finish(), "");
    }
}
