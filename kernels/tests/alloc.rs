//! `reuse_freed_memory` as a program applies it: first thing in `main` (this test has no
//! harness, so it runs on the main thread before any other thread exists).
//!
//! After it, a 64 MiB buffer allocated on the main thread or on a thread started later comes
//! from the heap: glibc's count of separately mapped bytes does not grow by its size.

fn main() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        assert!(llamagen_kernels::alloc::reuse_freed_memory());
        let mapped = || unsafe { libc::mallinfo2() }.hblkhd;
        let n = 64 << 20;
        let check = move |on: &str| {
            let before = mapped();
            let a = std::hint::black_box(vec![1u8; n]);
            let after = mapped();
            assert!(
                after < before + n,
                "{on}: a {n}-byte buffer was mapped on its own ({before} → {after} mapped bytes)"
            );
            assert_eq!(std::hint::black_box(&a)[n - 1], 1);
        };
        check("main thread");
        std::thread::spawn(move || check("later thread"))
            .join()
            .unwrap();
        // Freed and allocated again: served from the kept memory, still not mapped.
        check("main thread, again");
        println!("alloc: large buffers come from the heap on every thread");
    }
}
