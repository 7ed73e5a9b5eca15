fn main() {
    println!("pagoda {} ({})", env!("CARGO_PKG_VERSION"), env!("PAGODA_GIT_REV"));
}
