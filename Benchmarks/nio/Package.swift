// swift-tools-version:6.0
// SwiftNIO contender of the knet benchmark suite: kept in its own package so
// knet itself never depends on SwiftNIO.
import PackageDescription

let package = Package(
    name: "nio-pingpong",
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
    ],
    targets: [
        .executableTarget(
            name: "nio-pingpong",
            dependencies: [
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ],
            swiftSettings: [.swiftLanguageMode(.v6)]
        ),
    ]
)
