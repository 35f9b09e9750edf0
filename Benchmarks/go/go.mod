module knetbench/go

go 1.19
