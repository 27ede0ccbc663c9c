//! Prints the tcp fabric figures (needs root): `cargo run --release --example bench_tcp [--quick]`.

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let secure = !std::env::args().any(|a| a == "--insecure");
    match devlend_fabric_tcp::bench::figures_with(quick, secure) {
        Ok(figs) => {
            for f in figs {
                println!(
                    "{:<24} {:>10.3} {:<5} baseline {:?} ratio {:?} meets {:?}",
                    f.name,
                    f.value,
                    f.unit,
                    f.baseline,
                    f.ratio(),
                    f.meets()
                );
            }
        }
        Err(e) => {
            eprintln!("bench_tcp: {e}");
            std::process::exit(1);
        }
    }
}
