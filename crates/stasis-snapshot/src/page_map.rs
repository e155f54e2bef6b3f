//! A diff snapshot's page map: for every guest page (all regions, in file
//! order), whether its contents are zero, stored in this snapshot's memory
//! file, or to be taken from the parent. Two bits per page, four pages per
//! byte, least significant bits first; `3` never occurs, and the bits past
//! the last page are zero.
//!
//! The map is explicit so that a hole in a diff's memory file never has to
//! be guessed at: "zero" and "in the parent" are different answers.

use crate::error::{Error, Result};

/// Where a page's contents are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageSource {
    /// All zero (a hole in this snapshot's memory file).
    Zero = 0,
    /// In this snapshot's memory file.
    Here = 1,
    /// The same as in the parent (a hole here).
    Parent = 2,
}

/// The page map of a diff snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageMap {
    bytes: Vec<u8>,
    pages: u64,
}

impl PageMap {
    /// A map of `pages` pages, all [`PageSource::Zero`].
    pub fn new(pages: u64) -> PageMap {
        PageMap {
            bytes: vec![0; pages.div_ceil(4) as usize],
            pages,
        }
    }

    /// Decodes a map of `pages` pages, refusing a wrong length, the value 3
    /// or set padding bits.
    pub fn from_bytes(bytes: Vec<u8>, pages: u64) -> Result<PageMap> {
        let bad = |d: String| Error::ManifestInvalid(format!("page map: {d}"));
        if bytes.len() as u64 != pages.div_ceil(4) {
            return Err(bad(format!(
                "{} bytes for {pages} pages (needs {})",
                bytes.len(),
                pages.div_ceil(4)
            )));
        }
        for (i, b) in bytes.iter().enumerate() {
            for k in 0..4u64 {
                let page = i as u64 * 4 + k;
                let v = (b >> (2 * k)) & 3;
                if page >= pages && v != 0 {
                    return Err(bad(format!("bits set past the last page in byte {i}")));
                }
                if v == 3 {
                    return Err(bad(format!("page {page} has the invalid value 3")));
                }
            }
        }
        Ok(PageMap { bytes, pages })
    }

    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Where page `page` is (pages past the end are zero).
    pub fn get(&self, page: u64) -> PageSource {
        if page >= self.pages {
            return PageSource::Zero;
        }
        match (self.bytes[(page / 4) as usize] >> (2 * (page % 4))) & 3 {
            1 => PageSource::Here,
            2 => PageSource::Parent,
            _ => PageSource::Zero,
        }
    }

    /// Records where page `page` is.
    pub fn set(&mut self, page: u64, src: PageSource) {
        let (i, shift) = ((page / 4) as usize, 2 * (page % 4));
        self.bytes[i] = (self.bytes[i] & !(3 << shift)) | ((src as u8) << shift);
    }

    /// The encoded map.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// How many pages are `src`.
    pub fn count(&self, src: PageSource) -> u64 {
        (0..self.pages).filter(|&p| self.get(p) == src).count() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bad_encodings() {
        let mut m = PageMap::new(6);
        m.set(0, PageSource::Here);
        m.set(3, PageSource::Parent);
        m.set(5, PageSource::Here);
        m.set(0, PageSource::Parent);
        let back = PageMap::from_bytes(m.as_bytes().to_vec(), 6).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.get(0), PageSource::Parent);
        assert_eq!(back.get(1), PageSource::Zero);
        assert_eq!(back.get(5), PageSource::Here);
        assert_eq!(back.count(PageSource::Parent), 2);
        assert!(PageMap::from_bytes(vec![0; 3], 6).is_err());
        assert!(PageMap::from_bytes(vec![3, 0], 6).is_err());
        assert!(PageMap::from_bytes(vec![0, 0b0100_0000], 6).is_err());
    }
}
