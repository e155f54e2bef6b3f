//! A diff snapshot's `page-map.bin` as `SnapshotReader::page_map` decodes
//! it: [`stasis_snapshot::PageMap::from_bytes`] with the page count the
//! manifest's regions give. A map it accepts is then read back page by
//! page, and must hold exactly the bytes it was made from.
//!
//! Input: a header byte, then the map's bytes. The page count is four per
//! byte less `header & 3` (the padding in the last byte), so that most
//! inputs have the right length; with bit 7 set, `(header >> 2) & 31` more
//! pages are asked for, so that the length check is exercised too.
//!
//! Seeds: `make-seeds.sh` copies the page maps of snapshot fixtures.

#![no_main]

use libfuzzer_sys::fuzz_target;
use stasis_snapshot::{PageMap, PageSource};

fuzz_target!(|data: &[u8]| {
    let Some((&header, bytes)) = data.split_first() else { return };
    let mut pages = (bytes.len() as u64 * 4).saturating_sub(u64::from(header & 3));
    if header & 0x80 != 0 {
        pages += u64::from((header >> 2) & 31);
    }
    let mut map = match PageMap::from_bytes(bytes.to_vec(), pages) {
        Ok(m) => m,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    assert_eq!(map.pages(), pages);
    assert_eq!(map.as_bytes(), bytes, "an accepted map is kept as it was");
    let counts = [PageSource::Zero, PageSource::Here, PageSource::Parent].map(|s| map.count(s));
    assert_eq!(counts.iter().sum::<u64>(), pages, "every page is zero, here or in the parent");
    assert_eq!(map.get(pages), PageSource::Zero, "pages past the end read as zero");
    // Writing every page back as it reads gives the same map.
    for p in 0..pages {
        let src = map.get(p);
        map.set(p, src);
    }
    assert_eq!(map.as_bytes(), bytes);
});
