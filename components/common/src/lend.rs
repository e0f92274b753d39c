//! The protocol between `lender` and `borrower`.
//!
//! Word 0 of a call to the lender is the operation. [`OP_LEND`]: word 1 is
//! the page number in the caller's memory receive window where the page
//! should land; the reply carries a typed item with the page (read-only).
//! [`OP_REVOKE`]: the lender revokes every page it lent. Reply word 0 is a
//! status code.

pub const OP_LEND: u64 = 1;
pub const OP_REVOKE: u64 = 2;
pub const PAGE_WORDS: usize = 512;

/// Word `i` of the lent page: distinct per word, not a repeat of the index.
pub const fn pattern_word(i: usize) -> u64 {
    (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x6d6f_6174_6c65_6e64
}

pub const fn pattern_page() -> [u64; PAGE_WORDS] {
    let mut page = [0; PAGE_WORDS];
    let mut i = 0;
    while i < PAGE_WORDS {
        page[i] = pattern_word(i);
        i += 1;
    }
    page
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_words_are_distinct() {
        let page = pattern_page();
        let mut sorted = page.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), PAGE_WORDS);
        assert_eq!(page[3], pattern_word(3));
    }
}
