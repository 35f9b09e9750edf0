// nio-pingpong: the SwiftNIO contender of knet's ping-pong benchmark suite.
//
//   nio-pingpong [--host H] server PORT THREADS
//   nio-pingpong [--host H] client PORT CONNS BLOCK SECONDS THREADS
//
// Raw echo over TCP with TCP_NODELAY; the client prints the four result lines
// every contender prints (see Benchmarks/README.md).
import NIOCore
import NIOPosix
import Synchronization

/// Client connections that closed before the end of the run.
let lostConnections = Atomic<Int>(0)

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Writes s to standard error (the C `stderr` global is not concurrency-safe in Swift 6).
func printError(_ s: String) {
    var s = s
    s.withUTF8 { p in _ = write(2, p.baseAddress, p.count) }
}

/// Prints the usage to stderr and exits with status 2.
func usage() -> Never {
    printError("""
    usage: nio-pingpong [--host H] server PORT THREADS
           nio-pingpong [--host H] client PORT CONNS BLOCK SECONDS THREADS

    """)
    exit(2)
}

/// Raises the soft open-file limit to the hard limit (10,000-connection runs).
func raiseOpenFileLimit() {
    var rl = rlimit()
    #if canImport(Glibc)
    let resource = __rlimit_resource_t(RLIMIT_NOFILE.rawValue)
    #else
    let resource = RLIMIT_NOFILE
    #endif
    if getrlimit(resource, &rl) == 0 && rl.rlim_cur < rl.rlim_max {
        rl.rlim_cur = rl.rlim_max
        _ = setrlimit(resource, &rl)
    }
}

/// Parses a positive integer argument or exits with the usage.
func positive(_ s: String) -> Int {
    guard let v = Int(s), v > 0 else { usage() }
    return v
}

/// Echo server handler: writes back every buffer read, flushes once per read burst.
final class EchoHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        context.write(data, promise: nil)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        context.flush()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}

// LoopCounter (the per-thread counters): LoopCounter.swift, shared with the other Swift contender.

/// Client handler: sends the first block, then echoes and counts every read.
final class PingPongHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private let blockSize: Int

    init(blockSize: Int) {
        self.blockSize = blockSize
    }

    func channelActive(context: ChannelHandlerContext) {
        _ = LoopCounter.current // registered before the count starts
        var buf = context.channel.allocator.buffer(capacity: blockSize)
        for i in 0..<blockSize { buf.writeInteger(UInt8(i % 128)) }
        context.writeAndFlush(wrapOutboundOut(buf), promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let n = unwrapInboundIn(data).readableBytes
        LoopCounter.add(n)
        context.write(data, promise: nil)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        context.flush()
    }

    func channelInactive(context: ChannelHandlerContext) {
        lostConnections.add(1, ordering: .relaxed) // the client never closes one itself
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}

/// Runs the echo server until SIGTERM/SIGINT.
func runServer(host: String, port: Int, threads: Int) throws -> Never {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: threads)
    let channel = try ServerBootstrap(group: group)
        .serverChannelOption(.backlog, value: 4096)
        .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
        .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
        .childChannelInitializer { channel in
            channel.eventLoop.makeCompletedFuture {
                try channel.pipeline.syncOperations.addHandler(EchoHandler())
            }
        }
        .bind(host: host, port: port)
        .wait()
    try channel.closeFuture.wait()
    exit(0)
}

/// Runs the client for `seconds` and prints the four result lines.
func runClient(host: String, port: Int, conns: Int, block: Int, seconds: Int, threads: Int) throws -> Never {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: threads)
    // Resolved once, and one connection after another: connect(host:port:) resolves on a
    // concurrent queue, so connections would reach the server in random order and, with
    // two loop threads, client loops would pair with server loops at random. In order,
    // connection i is on client loop i % THREADS and server loop i % THREADS, as in the
    // other contenders.
    let address = try SocketAddress.makeAddressResolvingHost(host, port: port)
    for _ in 0..<conns {
        _ = try ClientBootstrap(group: group)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(
                        PingPongHandler(blockSize: block))
                }
            }
            .connect(to: address)
            .wait()
    }
    // Counted from the moment every connection is up.
    let start = LoopCounter.totals()

    var left = timespec(tv_sec: seconds, tv_nsec: 0)
    var req = left
    while nanosleep(&req, &left) != 0 && errno == EINTR { req = left }

    let end = LoopCounter.totals()
    let bytes = end.bytes - start.bytes
    let messages = end.messages - start.messages
    let avg = messages > 0 ? bytes / messages : 0
    let mibps = Double(bytes) / Double(seconds) / 1048576.0
    let tenths = Int((mibps * 10).rounded())
    print("\(bytes) total bytes read")
    print("\(messages) total messages read")
    print("\(avg) average message size")
    print("\(tenths / 10).\(tenths % 10) MiB/s throughput")
    fflush(nil)
    let lost = lostConnections.load(ordering: .relaxed)
    if lost > 0 {
        printError("\(lost) of \(conns) connections closed during the run\n")
        exit(1)
    }
    exit(0)
}

signal(SIGTERM) { _ in _exit(0) }
signal(SIGINT) { _ in _exit(0) }
signal(SIGPIPE, SIG_IGN)
raiseOpenFileLimit()

var args = Array(CommandLine.arguments.dropFirst())
var host = "127.0.0.1"
if args.first == "--host" {
    guard args.count >= 2 else { usage() }
    host = args[1]
    args.removeFirst(2)
}
guard let mode = args.first else { usage() }
do {
    switch mode {
    case "server" where args.count == 3:
        try runServer(host: host, port: positive(args[1]), threads: positive(args[2]))
    case "client" where args.count == 6:
        try runClient(host: host, port: positive(args[1]), conns: positive(args[2]),
                      block: positive(args[3]), seconds: positive(args[4]), threads: positive(args[5]))
    default:
        usage()
    }
} catch {
    printError("nio-pingpong: \(error)\n")
    exit(1)
}
