//! How an error is told to a person: the message of each layer, and each cause only
//! where the layer above did not already say it.

/// `e` and its causes on one line, as anyhow's `{:#}` joins them, but without the
/// repetition: twinfs's error messages are complete on their own (they are logged and
/// sent over the control socket with `{}`), so most embed their cause (`cannot read
/// FILE: No such file or directory`), which their `source()` gives again.
pub fn text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let said = cause.to_string();
        if text.is_empty() {
            text = said;
        } else if !said.is_empty() && !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_the_message_holds_is_said_once() {
        let missing = std::path::Path::new("/nonexistent-twinfs-dir/twinfs.toml");
        let e = anyhow::Error::new(crate::config::Config::load(missing).expect_err("no such file"));
        assert_eq!(
            text(&e),
            "/nonexistent-twinfs-dir/twinfs.toml: cannot read: No such file or directory (os error 2)"
        );
        let e = e.context("cannot start");
        assert_eq!(
            text(&e),
            "cannot start: /nonexistent-twinfs-dir/twinfs.toml: cannot read: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn a_cause_the_message_leaves_out_is_said() {
        let e = anyhow::Error::new(std::io::Error::from_raw_os_error(libc::EACCES))
            .context("volume cmm: cannot mount /etc/cmm");
        assert_eq!(
            text(&e),
            "volume cmm: cannot mount /etc/cmm: Permission denied (os error 13)"
        );
    }
}
