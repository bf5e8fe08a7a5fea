//! The NBD server (what a local client such as the kernel's nbd driver or qemu-io sends
//! it): the fixed-newstyle handshake and transmission requests, served from a small
//! sparse image. The first byte picks whether the handshake runs.
#![no_main]

use std::io::{Read, Write};
use std::sync::OnceLock;

use ferry_disk::nbd::{self, WriteLimit};
use ferry_disk::DiskImage;
use libfuzzer_sys::fuzz_target;

/// The client's bytes in, the server's answers discarded.
struct Client<'a> {
    input: &'a [u8],
}

impl Read for Client<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(out)
    }
}

impl Write for Client<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn image() -> &'static DiskImage {
    static IMAGE: OnceLock<(DiskImage, std::path::PathBuf)> = OnceLock::new();
    &IMAGE
        .get_or_init(|| {
            // A tmpfs when there is one: flush requests fsync, which a disk makes slow.
            let shm = std::path::Path::new("/dev/shm");
            let base = if shm.is_dir() {
                shm.to_path_buf()
            } else {
                std::env::temp_dir()
            };
            let dir = base.join(format!("ferry-fuzz-nbd-{}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("temp dir");
            let path = dir.join("disk.img");
            let (img, _) = DiskImage::open_or_create(&path, 4096, 64).expect("image");
            (img, dir)
        })
        .0
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, input)) = data.split_first() else {
        return;
    };
    let limit = WriteLimit::default();
    let client = Client { input };
    let _ = if pick & 1 == 0 {
        nbd::serve(client, image(), &limit)
    } else {
        nbd::serve_transmission(client, image(), &limit)
    };
});
