//! (being written)
pub fn run(_target: Option<&str>, _seconds: u64) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
