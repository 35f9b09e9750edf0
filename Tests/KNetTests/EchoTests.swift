import Dispatch
import Foundation
import KNet
import Synchronization
import Testing

/// The codecs the echo test runs with (Swift Testing arguments must be Sendable and printable).
enum CodecCase: String, CaseIterable, Sendable, CustomTestStringConvertible {
    case raw, std, lengthField4, lengthField1LittleEndian, lengthField8, swiftHeaderBody
    /// The built-in codecs' Swift implementations on the server, the C ones on the client.
    case swiftStdAgainstC, swiftLengthField2LittleEndianAgainstC

    var testDescription: String { rawValue }

    func make() -> (any Codec)? {
        switch self {
        case .raw: return nil
        case .std: return StdCodec()
        case .lengthField4: return LengthFieldCodec(lengthBytes: 4, endianness: .big, maxFrame: 1 << 20)
        case .lengthField1LittleEndian: return LengthFieldCodec(lengthBytes: 1, endianness: .little)
        case .lengthField8: return LengthFieldCodec(lengthBytes: 8, endianness: .little, maxFrame: 1 << 20)
        case .swiftHeaderBody: return HeaderBodyCodec()
        case .swiftStdAgainstC: return SwiftOnly(StdCodec())
        case .swiftLengthField2LittleEndianAgainstC: return SwiftOnly(LengthFieldCodec(lengthBytes: 2, endianness: .little))
        }
    }

    /// The client's codec: the same, or the C codec a Swift-only wrapper stands for.
    func makeClientCodec() -> (any Codec)? {
        switch self {
        case .swiftStdAgainstC: return StdCodec()
        case .swiftLengthField2LittleEndianAgainstC: return LengthFieldCodec(lengthBytes: 2, endianness: .little)
        default: return make()
        }
    }

    var messageSizes: [Int] {
        switch self {
        case .raw: return [1, 100, 70_000, 300_000]
        case .std, .swiftStdAgainstC, .swiftLengthField2LittleEndianAgainstC: return [0, 1, 2, 1000, 65_535, 3]
        case .lengthField1LittleEndian: return [0, 1, 255, 17]
        case .lengthField4, .lengthField8, .swiftHeaderBody: return [0, 1, 65_536, 200_000, 5]
        }
    }
}

/// Runs a codec's Swift read/write (knet would otherwise use the C codec it stands for).
struct SwiftOnly<Inner: Codec>: Codec {
    let inner: Inner
    init(_ inner: Inner) { self.inner = inner }
    func read(from reader: inout ByteReader) throws -> [UInt8] { try inner.read(from: &reader) }
    func write(to writer: inout ByteWriter, _ message: [UInt8]) throws { try inner.write(to: &writer, message) }
    var maxFrameSize: Int { inner.maxFrameSize }
}

extension KNetTests {
    @Test("echo round trip through a TCPServer and a TCPClient", arguments: CodecCase.allCases)
    func echo(codecCase: CodecCase) throws {
        let serverHandler = RecordingHandler(echo: true)
        let server = try ServerHarness(handler: serverHandler, codec: codecCase.make())
        let messages = codecCase.messageSizes.enumerated().map { pattern($1, offset: $0) }
        let clientHandler = RecordingHandler(onConnect: { conn in
            for message in messages { try? conn.send(message) }
        })
        let client = ClientHarness(port: server.port, handler: clientHandler, codec: codecCase.makeClientCodec())
        let total = messages.reduce(0) { $0 + $1.count }
        #expect(eventually { clientHandler.totalBytes == total })

        let received = try #require(clientHandler.only)
        if codecCase == .raw {
            // A raw stream keeps the bytes, not the message boundaries.
            #expect(received.bytes == messages.flatMap { $0 })
        } else {
            #expect(received.messages == messages)
            #expect(serverHandler.only?.messages == messages)
        }
        #expect(client.client.connection != nil)
        #expect(client.stop() == .clientClosed)
        #expect(client.client.connection == nil)
        #expect(server.stop() == .serverClosed)
        #expect(clientHandler.snapshot.contractFailures == 0)
        #expect(serverHandler.snapshot.contractFailures == 0)
    }

    @Test("a Swift codec reading header and body separately gets every frame from a one-byte-at-a-time peer")
    func oneByteAtATime() throws {
        let codec = HeaderBodyCodec()
        let handler = RecordingHandler()
        let server = try ServerHarness(handler: handler, codec: codec)
        let frames = [0, 1, 2, 3, 7, 64, 300].enumerated().map { pattern($1, offset: $0 * 7) }
        var wire: [UInt8] = []
        for frame in frames {
            wire += withUnsafeBytes(of: UInt32(frame.count).bigEndian) { Array($0) }
            wire += frame
        }
        let peer = try PlainSocket(port: server.port)
        for (index, byte) in wire.enumerated() {
            try peer.write([byte])
            // Wait until the codec saw this byte, so every partial frame length is offered.
            let seen = eventually { codec.observed.load(ordering: .relaxed) >= index + 1 }
            try #require(seen, "codec never saw byte \(index)")
        }
        #expect(eventually { handler.totalMessages == frames.count })
        #expect(handler.only?.messages == frames)
        // One call per byte at least: the codec really was called on partial frames.
        #expect(codec.calls.load(ordering: .relaxed) >= wire.count)
        #expect(server.stop() == .serverClosed)
    }

    @Test("sends from several threads arrive in order per thread")
    func orderingAcrossThreads() throws {
        let threads = 4
        let perThread = 1000
        let handler = RecordingHandler()
        let server = try ServerHarness(handler: handler, codec: StdCodec())
        let client = ClientHarness(port: server.port, handler: nil, codec: StdCodec())
        #expect(eventually { client.client.connection != nil })
        let conn = try #require(client.client.connection)

        let senders = (0..<threads).map { thread in
            Background {
                for seq in 0..<perThread {
                    var message: [UInt8] = [UInt8(thread)]
                    message += withUnsafeBytes(of: UInt32(seq).bigEndian) { Array($0) }
                    try conn.send(message)
                }
            }
        }
        for sender in senders { #expect(sender.join() == nil) }
        #expect(eventually { handler.totalMessages == threads * perThread })

        var sequences = [[Int]](repeating: [], count: threads)
        for message in handler.only?.messages ?? [] {
            let seq = message[1...].reduce(0) { $0 << 8 | Int($1) }
            sequences[Int(message[0])].append(seq)
        }
        for thread in 0..<threads {
            #expect(sequences[thread] == Array(0..<perThread), "thread \(thread) out of order")
        }
        #expect(client.stop() == .clientClosed)
        #expect(server.stop() == .serverClosed)
    }

    @Test("a Swift codec's write error fails only that send: .codec unless it is a negative KNetError, nothing sent")
    func codecWriteErrorSendsNothing() throws {
        /// Writes half a frame, then fails as the message's first byte says.
        struct FailingWriteCodec: Codec {
            struct Custom: Error {}
            func read(from reader: inout ByteReader) throws -> [UInt8] { reader.readAll() }
            func write(to writer: inout ByteWriter, _ message: [UInt8]) throws {
                writer.writeBytes([0xEE])
                switch message.first {
                case 1: throw KNetError.system(errno: 0) // code 0 is not an error code
                case 2: throw KNetError.system(errno: -5) // nor is a positive one
                case 3: throw KNetError.busy
                case 4: throw Custom()
                default: writer.writeBytes(message)
                }
            }
        }
        let handler = RecordingHandler()
        let server = try ServerHarness(handler: handler, codec: FailingWriteCodec())
        let peer = try PlainSocket(port: server.port)
        #expect(eventually { handler.only?.object != nil })
        let conn = try #require(handler.only?.object)
        #expect(throws: KNetError.codec) { try conn.send([1]) }
        #expect(throws: KNetError.codec) { try conn.send([2]) }
        #expect(throws: KNetError.busy) { try conn.send([3]) }
        #expect(throws: KNetError.codec) { try conn.send([4]) }
        try conn.send([9, 9])
        #expect(try peer.read(exactly: 3) == [0xEE, 9, 9], "only the good frame reached the wire")
        #expect(conn.closeReason == .open)
        #expect(server.stop() == .serverClosed)
    }

    @Test("the built-in codecs report the frame limits the C codecs apply")
    func codecFrameLimits() throws {
        #expect(DefaultCodec().maxFrameSize == 0) // the core's default
        #expect(StdCodec().maxFrameSize == 65_535 + 2)
        #expect(LengthFieldCodec(lengthBytes: 1).maxFrameSize == 255 + 1) // the prefix bounds it
        #expect(LengthFieldCodec(lengthBytes: 2, maxFrame: 100).maxFrameSize == 100 + 2)
        #expect(LengthFieldCodec(lengthBytes: 2, maxFrame: 1 << 20).maxFrameSize == 65_535 + 2)
        #expect(LengthFieldCodec(lengthBytes: 4).maxFrameSize == (16 << 20) + 4)
        #expect(LengthFieldCodec(lengthBytes: 8, maxFrame: Int.max).maxFrameSize == Int.max)
        // Sending through the Swift write: what the prefix cannot hold is refused.
        let serverHandler = RecordingHandler()
        let server = try ServerHarness(handler: serverHandler, codec: SwiftOnly(LengthFieldCodec(lengthBytes: 1)))
        let handler = RecordingHandler()
        let client = ClientHarness(port: server.port, handler: handler, codec: SwiftOnly(LengthFieldCodec(lengthBytes: 1)))
        #expect(eventually { handler.only?.object != nil })
        let conn = try #require(handler.only?.object)
        #expect(throws: KNetError.codec) { try conn.send([UInt8](repeating: 1, count: 256)) }
        try conn.send([UInt8](repeating: 1, count: 255))
        #expect(eventually { serverHandler.totalMessages == 1 })
        #expect(serverHandler.only?.messages == [[UInt8](repeating: 1, count: 255)])
        #expect(client.stop() == .clientClosed)
        #expect(server.stop() == .serverClosed)
    }

    @Test("a Swift codec error closes only that connection")
    func codecErrorClosesOnlyThatConnection() throws {
        let handler = RecordingHandler(echo: true)
        let server = try ServerHarness(handler: handler, codec: HeaderBodyCodec(rejectLengthAbove: 100))
        let good = try PlainSocket(port: server.port)
        let bad = try PlainSocket(port: server.port)
        #expect(eventually { handler.connectionCount == 2 })
        try bad.write([0, 0, 1, 0])  // a 256-byte frame: rejected
        #expect(try bad.read() == [], "the bad connection is closed")
        try good.write([0, 0, 0, 2, 42, 43])
        #expect(try good.read(exactly: 6) == [0, 0, 0, 2, 42, 43], "the other connection still echoes")
        #expect(eventually { handler.snapshot.connections.values.contains { $0.disconnects == 1 } })
        let reasons = handler.snapshot.connections.values.compactMap(\.reasonAtDisconnect)
        #expect(reasons == [.error(.codec)])
        #expect(server.stop() == .serverClosed)
    }

    @Test("raw reads handed to the handler stay intact while kept, and pin at most 4x their size (or 64 bytes)")
    func keptRawReadsStayIntact() throws {
        let handler = RecordingHandler()
        let server = try ServerHarness(handler: handler, codec: nil)
        let peer = try PlainSocket(port: server.port)
        let pieces = [70_000, 5, 16_384, 1_500, 3_000, 200, 65_536, 40_000, 1, 2_048]
        var stream: [UInt8] = []
        for round in 0..<4 {
            for size in pieces {
                let piece = pattern(size, offset: stream.count + round)
                stream += piece
                try peer.write(piece)
                // One piece at a time, so reads of every size happen (and later reads could
                // overwrite an array handed over earlier if it were reused).
                let total = stream.count
                try #require(eventually { handler.totalBytes == total })
            }
        }
        let messages = try #require(handler.only).messages
        #expect(messages.flatMap { $0 } == stream)
        for message in messages {
            #expect(message.capacity <= max(4 * message.count, 64), "a \(message.count)-byte read keeps \(message.capacity) bytes")
        }
        // Large reads really were handed over in the read buffer (a copy is sized to fit).
        #expect(messages.contains { $0.capacity >= $0.count + 1024 })
        #expect(server.stop() == .serverClosed)
    }

    @Test("raw reads the handler drops make room for the next read; the ones it keeps stay intact")
    func droppedRawReadsDoNotDisturbKeptOnes() throws {
        /// Keeps every third array it gets (and a copy of every message's bytes).
        final class KeepingSome: TCPHandler {
            struct State: Sendable {
                var copies: [[UInt8]] = []
                var kept: [Int: [UInt8]] = [:]
                var bytes = 0
            }
            let state = Locked(State())
            func receive(_ conn: TCPConnection, _ buf: [UInt8]) {
                let copy = buf.withUnsafeBytes { Array($0) }  // a real copy, not shared storage
                state.withLock { state in
                    let index = state.copies.count
                    state.copies.append(copy)
                    state.bytes += copy.count
                    if index % 3 == 0 { state.kept[index] = buf }
                }
            }
        }
        let handler = KeepingSome()
        let server = try ServerHarness(handler: handler, codec: nil)
        let peer = try PlainSocket(port: server.port)
        // Small pieces too: they are copied into one array that is reused when dropped.
        let pieces = [3_001, 3_000, 2_999, 3_000, 3_001, 3_000, 20_000, 1_500, 60_001, 3_000, 5, 3_001, 3_000, 4_100,
                      64, 64, 63, 64, 65, 64, 1, 1_023, 64, 200, 17, 64, 64, 900, 64]
        var stream: [UInt8] = []
        for round in 0..<3 {
            for size in pieces {
                let piece = pattern(size, offset: stream.count + round)
                stream += piece
                try peer.write(piece)
                // One piece at a time, so each read reuses or replaces the previous array.
                let total = stream.count
                try #require(eventually { handler.state.withLock { $0.bytes } == total })
            }
        }
        let state = handler.state.withLock { $0 }
        // Booleans, so a failure names the message instead of printing megabytes.
        let delivered = state.copies.flatMap { $0 } == stream
        #expect(delivered, "the \(state.copies.count) messages do not add up to the \(stream.count) bytes sent")
        #expect(state.kept.count >= pieces.count)
        for (index, array) in state.kept.sorted(by: { $0.key < $1.key }) {
            let intact = array == state.copies[index]
            #expect(intact, "kept message \(index) (\(array.count) bytes) changed")
        }
        #expect(server.stop() == .serverClosed)
    }

    @Test("after small raw reads, large messages soon arrive in one receive each")
    func rawReadSizingRecovers() throws {
        let handler = RecordingHandler(echo: true, keepObjects: false)
        let server = try ServerHarness(handler: handler, codec: nil)
        let peer = try PlainSocket(port: server.port)
        let small = pattern(2000)
        try peer.write(small)
        #expect(try peer.read(exactly: small.count) == small)
        let large = pattern(16384, offset: 7)
        let rounds = 30
        for _ in 0..<rounds {  // one at a time: each arrives whole (one loopback segment)
            try peer.write(large)
            #expect(try peer.read(exactly: large.count) == large)
        }
        // The spare grows over the first message's reads and is kept through its short
        // tail: one receive per message after that (the odd split aside). Sizing it down
        // at every short tail took three receives for every message.
        let receives = handler.totalMessages - 1
        #expect(receives <= rounds + 10, "\(receives) receives for \(rounds) messages")
        #expect(server.stop() == .serverClosed)
    }

    @Test("steady raw reads of 1 KiB and a little more arrive in the array they were read into",
          arguments: [1024, 1025, 1026, 1500])
    func oneKiBReadsHandedOver(size: Int) throws {
        let capacities = Locked<[Int]>([])
        let handler = RecordingHandler(keepObjects: false, onReceive: { _, buf in
            capacities.withLock { $0.append(buf.capacity) }
        })
        let server = try ServerHarness(handler: handler, codec: nil)
        let peer = try PlainSocket(port: server.port)
        let rounds = 24
        for round in 0..<rounds {  // one at a time: each read is exactly `size` bytes
            try peer.write(pattern(size, offset: round))
            try #require(eventually { capacities.withLock { $0.count } == round + 1 })
        }
        // After a few reads (four short ones in a row size the spare down) each read lands
        // in the spare itself, whose capacity is well over the read (a copy's fits it).
        // A 4 KiB spare asked for in full got 4104 bytes, over 4 × 1024: reads of 1024
        // and 1025 bytes were copied for ever, the spare remade after every four.
        let tail = capacities.withLock { Array($0.suffix(8)) }
        let handedOver = tail.filter { $0 >= size + 1024 }.count
        #expect(handedOver == tail.count, "capacities of the last reads: \(tail)")
        #expect(server.stop() == .serverClosed)
    }
}
