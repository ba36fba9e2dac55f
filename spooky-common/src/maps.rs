//! Names and `#[repr(C)]` value layouts of the BPF maps shared by `spooky-ebpf` and user space.
//! Every layout here has a size assertion; user space gets `aya::Pod` through the `user` feature.
