//! Quick smoke test while developing.
use twinfs_tests::inproc::MountedDir;

#[test]
fn smoke() {
    let m = MountedDir::new(true, |p| std::fs::write(p.join("old"), b"hello").unwrap());
    std::fs::write(m.path.join("new"), b"x").unwrap();
    let p = m.path.clone();
    let t = std::time::Instant::now();
    drop(m);
    println!("drop took {:?}; mounted={}", t.elapsed(), twinfs_tests::is_mounted(&p));
    assert_eq!(std::fs::read(p.join("new")).unwrap(), b"x");
}
