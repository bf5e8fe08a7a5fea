//! The source side of a post-copy recovery when the source process is gone: the blocks a
//! held destination still owes are served from the images that process left behind.
//!
//! The images stopped changing when the source paused its guest (and stay locked while
//! they are served here), so they hold exactly the versions the destination waits for.
//! The destination accepts them only for the migration it names and images of the same
//! identity; every block travels with its digest.

use std::path::PathBuf;

use ferry_core::bitmap::Bitmap;
use ferry_core::guest::{GuestError, GuestLayout, GuestStorage, SourceGuest, StateBlob};

use crate::image::DiskImage;
use crate::set::GuestDisks;

/// A "guest" made of disk images only, to push owed blocks from.
pub struct ImageSource {
    disks: GuestDisks,
    layout: GuestLayout,
}

impl ImageSource {
    /// Opens existing images read as they are (locked, metadata untouched).
    pub fn open(paths: &[PathBuf], block_size: u32) -> Result<Self, GuestError> {
        let mut images = Vec::with_capacity(paths.len());
        for p in paths {
            let what = format!("opening the source image {}", p.display());
            let size = std::fs::metadata(p)
                .map_err(|source| GuestError::Io {
                    what: what.clone(),
                    source,
                })?
                .len();
            let bs = u64::from(block_size);
            if size == 0 || !size.is_multiple_of(bs) {
                return Err(GuestError::Unsupported(format!(
                    "{}: {size} bytes is not a whole number of {bs}-byte blocks",
                    p.display()
                )));
            }
            let (image, _) = DiskImage::open_or_create(p, block_size, size / bs)
                .map_err(|source| GuestError::Io { what, source })?;
            images.push(image);
        }
        let disks = GuestDisks::from_images(images);
        let layout = GuestLayout {
            backend: "image".into(),
            page_size: 4096,
            pages: 0,
            disks: disks.layouts(),
        };
        Ok(Self { disks, layout })
    }
}

fn no_guest() -> GuestError {
    GuestError::Unsupported("an image has no guest to run".into())
}

impl SourceGuest for ImageSource {
    fn layout(&self) -> GuestLayout {
        self.layout.clone()
    }

    fn start_dirty_log(&self) -> Result<(), GuestError> {
        Ok(())
    }

    fn stop_dirty_log(&self) {}

    fn fetch_dirty_pages(&self) -> Result<Bitmap, GuestError> {
        Ok(Bitmap::new(0))
    }

    fn merge_dirty_pages(&self, _pages: &Bitmap) {}

    fn storage(&self) -> Option<&dyn GuestStorage> {
        Some(&self.disks)
    }

    fn read_page(&self, _index: u64, _buf: &mut [u8]) -> Result<(), GuestError> {
        Err(no_guest())
    }

    fn pause(&self) -> Result<(), GuestError> {
        Err(no_guest())
    }

    fn resume(&self) -> Result<(), GuestError> {
        Err(no_guest())
    }

    fn save_state(&self) -> Result<StateBlob, GuestError> {
        Err(no_guest())
    }
}
