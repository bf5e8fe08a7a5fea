use super::*;
use std::sync::mpsc;

/// A private anonymous mapping of `pages` pages filled with their index.
fn mapping(pages: u64) -> memmap2::MmapMut {
    let mut m = memmap2::MmapOptions::new()
        .len(pages as usize * 4096)
        .map_anon()
        .unwrap();
    for (i, p) in m.chunks_mut(4096).enumerate() {
        p.fill(i as u8 ^ 0x5a);
    }
    m
}

fn available() -> bool {
    let ok = UffdBuilder::new().user_mode_only(false).create().is_ok();
    if !ok {
        eprintln!("skipping: userfaultfd is not available here (not root, or no kernel support)");
    }
    ok
}

#[test]
fn faults_on_owed_pages_are_pulled_and_installed_whole() {
    if !available() {
        return;
    }
    let pages = 64u64;
    let mut map = mapping(pages);
    let base = map.as_mut_ptr();
    let mut owed = Bitmap::new(pages);
    for i in [3u64, 10, 11, 40] {
        owed.set(i);
    }
    let (tx, rx) = mpsc::channel::<Vec<u64>>();
    let tx = Mutex::new(tx);
    let pull: PullPagesFn = Arc::new(move |p: &[u64]| {
        let _ = tx.lock().unwrap().send(p.to_vec());
    });
    // SAFETY: `map` outlives `mem` (dropped first, below) and is private anonymous.
    let mem = Arc::new(unsafe { OwedMemory::start(base, pages, 4096, &owed, pull) }.unwrap());
    assert_eq!(mem.owed(), 4);
    // A page that is not owed keeps its content and never asks.
    assert_eq!(map[5 * 4096], 5 ^ 0x5a);
    // The "source": answers each pull with a page of 0xEE (page 10 as a zero page).
    let server = {
        let mem = Arc::clone(&mem);
        std::thread::spawn(move || {
            let mut asked = Vec::new();
            while mem.owed() > 1 {
                let Ok(p) = rx.recv_timeout(Duration::from_secs(5)) else {
                    break;
                };
                for i in p {
                    asked.push(i);
                    let data = [0xEEu8; 4096];
                    mem.fill(i, (i != 10).then_some(&data[..])).unwrap();
                }
            }
            asked
        })
    };
    let addr = base as usize;
    let reader = std::thread::spawn(move || {
        // SAFETY: in-bounds reads of the mapping, which outlives this thread.
        unsafe {
            [3usize, 10, 11].map(|p| std::ptr::read_volatile((addr + p * 4096 + 7) as *const u8))
        }
    });
    assert_eq!(reader.join().unwrap(), [0xEE, 0, 0xEE]);
    // Page 40 was never touched: it is pushed, not pulled.
    assert!(mem.fill(40, Some(&[1u8; 4096])).unwrap());
    assert!(
        !mem.fill(40, Some(&[2u8; 4096])).unwrap(),
        "installed twice"
    );
    let mut asked = server.join().unwrap();
    asked.sort_unstable();
    assert_eq!(asked, [3, 10, 11]);
    assert_eq!(mem.owed(), 0);
    assert_eq!(map[40 * 4096 + 9], 1);
    let f = mem.figures();
    assert_eq!(f.faults, 3);
    assert!(f.latency_us[2] >= f.latency_us[0]);
    drop(mem);
    // Unregistered once everything arrived: ordinary access again.
    map[3 * 4096] = 9;
    assert_eq!(map[3 * 4096], 9);
}

#[test]
fn untouched_zero_pages_that_are_not_owed_fill_without_asking() {
    if !available() {
        return;
    }
    let pages = 16u64;
    // Never written: every page is missing.
    let mut map = memmap2::MmapOptions::new()
        .len(pages as usize * 4096)
        .map_anon()
        .unwrap();
    let base = map.as_mut_ptr();
    let mut owed = Bitmap::new(pages);
    owed.set(1);
    let pulls = Arc::new(AtomicU64::new(0));
    let p2 = Arc::clone(&pulls);
    let pull: PullPagesFn = Arc::new(move |p: &[u64]| {
        p2.fetch_add(p.len() as u64, Ordering::Relaxed);
    });
    // SAFETY: as above.
    let mem = unsafe { OwedMemory::start(base, pages, 4096, &owed, pull) }.unwrap();
    let addr = base as usize;
    let v = std::thread::spawn(move || {
        // SAFETY: in bounds.
        unsafe { std::ptr::read_volatile((addr + 9 * 4096) as *const u8) }
    })
    .join()
    .unwrap();
    assert_eq!(v, 0);
    assert_eq!(pulls.load(Ordering::Relaxed), 0);
    assert!(mem.fill(1, None).unwrap());
    assert!(mem.fill(99, None).is_err(), "out of range");
    drop(mem);
    map[0] = 1;
}
