// swift-tools-version:6.0
// An outside SwiftPM package using knet by path: scripts/check-swift-consumer.sh
// builds it against this checkout (reached as ../knet) and runs an echo round trip.
import PackageDescription

let package = Package(
    name: "app",
    dependencies: [.package(path: "../knet")],
    targets: [
        .executableTarget(name: "app", dependencies: [.product(name: "KNet", package: "knet")]),
    ],
    swiftLanguageModes: [.v6]
)
