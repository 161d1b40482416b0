//! Container image archive → ext4 root filesystem.
