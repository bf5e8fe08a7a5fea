//! Initial content: memory fill (`--fill zero|random|FILE`).

use ferry_disk::content::{random_bytes, read_image, Fill};

use crate::memory::GuestMemory;

/// Fills the data pages from `first_data_page` on.
pub fn fill_memory(
    mem: &GuestMemory,
    first_data_page: u64,
    fill: &Fill,
    seed: u64,
) -> Result<(), String> {
    let ps = mem.page_size();
    match fill {
        Fill::Zero => Ok(()),
        Fill::Random => {
            mem.fill_pages_parallel(first_data_page, mem.pages(), |i, page| {
                random_bytes(seed ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15), page);
            });
            Ok(())
        }
        Fill::File(path) => {
            let need = (mem.pages() - first_data_page) * ps as u64;
            let image = read_image(path, need)?;
            let image_pages = (image.len() / ps).max(1);
            mem.fill_pages_parallel(first_data_page, mem.pages(), |i, page| {
                let k = ((i - first_data_page) as usize) % image_pages;
                let src = &image[k * ps..];
                let n = src.len().min(ps);
                page[..n].copy_from_slice(&src[..n]);
                page[n..].fill(0);
            });
            Ok(())
        }
    }
}
