//! Seal and open throughput of AEGIS-256, AEGIS-256X2 and AEGIS-256X4 (libaegis
//! through the aegis crate) on 4 KiB, 8 KiB, 64 KiB and 100-byte units, one core.
//! Evaluation for docs/BENCHMARKS.md; not used by atrest.

use aegis::aegis256::Aegis256;
use aegis::aegis256x2::Aegis256X2;
use aegis::aegis256x4::Aegis256X4;
use std::time::Instant;

fn main() {
    let key = [7u8; 32];
    let ad = [1u8; 64];
    for size in [4048usize, 8144, 65488, 100] {
        let mut buf = vec![0x5au8; size];
        let rounds = (400_000_000 / size.max(1000)) as u64;
        for round in 0..3 {
            let mut best = [0f64; 6];
            let mut nonce = [0u8; 32];
            // seal
            let t = Instant::now();
            for i in 0..rounds { nonce[..8].copy_from_slice(&i.to_le_bytes()); let c = Aegis256::<16>::new(&key, &nonce); std::hint::black_box(c.encrypt_in_place(&mut buf, &ad)); }
            best[0] = (rounds as f64 * size as f64) / t.elapsed().as_secs_f64() / 1e6;
            let t = Instant::now();
            for i in 0..rounds { nonce[..8].copy_from_slice(&i.to_le_bytes()); let c = Aegis256X2::<16>::new(&key, &nonce); std::hint::black_box(c.encrypt_in_place(&mut buf, &ad)); }
            best[1] = (rounds as f64 * size as f64) / t.elapsed().as_secs_f64() / 1e6;
            let t = Instant::now();
            for i in 0..rounds { nonce[..8].copy_from_slice(&i.to_le_bytes()); let c = Aegis256X4::<16>::new(&key, &nonce); std::hint::black_box(c.encrypt_in_place(&mut buf, &ad)); }
            best[2] = (rounds as f64 * size as f64) / t.elapsed().as_secs_f64() / 1e6;
            // open
            let c = Aegis256::<16>::new(&key, &nonce); let mut b1 = buf.clone(); let tag1 = c.encrypt_in_place(&mut b1, &ad);
            let t = Instant::now();
            for _ in 0..rounds { let mut x = b1.clone(); let c = Aegis256::<16>::new(&key, &nonce); std::hint::black_box(c.decrypt_in_place(&mut x, &tag1, &ad).is_ok()); }
            best[3] = (rounds as f64 * size as f64) / t.elapsed().as_secs_f64() / 1e6;
            let c = Aegis256X2::<16>::new(&key, &nonce); let mut b2 = buf.clone(); let tag2 = c.encrypt_in_place(&mut b2, &ad);
            let t = Instant::now();
            for _ in 0..rounds { let mut x = b2.clone(); let c = Aegis256X2::<16>::new(&key, &nonce); std::hint::black_box(c.decrypt_in_place(&mut x, &tag2, &ad).is_ok()); }
            best[4] = (rounds as f64 * size as f64) / t.elapsed().as_secs_f64() / 1e6;
            println!("size {size} round {round}: seal MB/s AEGIS-256 {:.0} X2 {:.0} X4 {:.0}; open(+clone) AEGIS-256 {:.0} X2 {:.0}", best[0], best[1], best[2], best[3], best[4]);
        }
    }
}
