//! Process-wide memory-allocator settings for the tensor-heavy commands.
//!
//! Invariant enforced here: with [`reuse_freed_memory`] applied at the start of `main`, before
//! any thread starts, glibc's `malloc` serves every allocation, however large and from whichever
//! thread, from its one main heap, and keeps freed memory (up to `KEEP_FREE` bytes above the
//! heap top) for the next allocation instead of returning it to the kernel. (Per-thread arenas
//! are capped at 64 MiB and map anything larger on its own, so there is one arena.)
//!
//! Why: by default each allocation above glibc's mmap threshold (at most 32 MiB) is a fresh
//! `mmap`. Model activations are far larger (one 256 px VQ activation of a batch of 4 is
//! 134 MB), so every such tensor faults in and zeroes each of its pages on first touch and is
//! unmapped again when dropped; on a 2-core machine that was 5–10 % of a VQ encode or GPT
//! training step. The cost of the setting: the resident size stays near its peak instead of
//! shrinking between steps.
//!
//! Elsewhere than Linux with glibc this does nothing.

/// Bytes of free memory at the top of a heap that `malloc` keeps instead of trimming.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const KEEP_FREE: libc::c_int = 1 << 30;

/// Applies the settings of the module invariant; returns whether the allocator accepted them
/// (`false` where they do not apply). Call it first thing in `main`: threads that already
/// allocated keep their own arenas.
pub fn reuse_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `mallopt` only changes allocator parameters; it is safe to call at any time.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1) == 1
                && libc::mallopt(libc::M_MMAP_MAX, 0) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, KEEP_FREE) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
